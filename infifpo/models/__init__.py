"""Models: resolving a name or path to a local model (`resolve`), the packaged PyPI pool (`packaged`) and the
chat templates shipped for it (`templates/`)."""
