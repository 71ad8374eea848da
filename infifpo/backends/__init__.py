"""Inference engines behind the sample and score stages: vLLM (``vllm_engine``, the only module importing vllm) and
transformers (``hf_engine``). Both implement the same two calls on token ids, so stages never care which runs.

Owns: the engine interface and ``load_engine``. Does not own: tokenisation (``infifpo.logprobs``) or files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Generation:
    """One sampled completion: its token ids (sampling model's tokenizer), decoded text, why it stopped
    ("stop" | "length"), and its summed generation log-prob in nats (raw, at temperature 1)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logp: float


@dataclass
class SamplingSpec:
    """Sampling parameters of one model: ``n`` samples per prompt, temperature, top-p, max new tokens, seed."""

    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int = 0


class Engine(Protocol):
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[list[Generation]]:
        """``spec.n`` generations for each prompt (given as token ids), in prompt order."""
        ...

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs (nats, raw) of each completion given its prompt, one list per request, in order."""
        ...

    def score_with_entropy(self, prompt_ids: list[list[int]],
                           completion_ids: list[list[int]]) -> tuple[list[list[float]], list[list[float]] | None]:
        """(``score``'s log-probs, the entropy in nats of the next-token distribution at each of those positions), or
        None for the entropies when the engine cannot compute full distributions (vLLM)."""
        ...

    def close(self) -> None: ...


def load_engine(backend: str, model_dir: str, **kwargs: Any) -> Engine:
    """Build an engine: ``backend`` is "vllm" or "transformers"; kwargs go to the engine's constructor."""
    if backend == "vllm":
        from infifpo.backends.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **kwargs)
    if backend in ("transformers", "hf"):
        from infifpo.backends.hf_engine import HFEngine

        return HFEngine(model_dir, **kwargs)
    raise ValueError(f"unknown backend {backend!r}: use 'vllm' or 'transformers'")
