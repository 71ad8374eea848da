"""Data preparation: named prompt sources and the `prompts` stage (`prompts`), and the vendored data with its
licence and provenance (`gsm8k/`). Imports only `infifpo.schema` and `infifpo.store`."""
