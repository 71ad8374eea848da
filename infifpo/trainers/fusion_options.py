"""The fused-reference options shared by InfiFPO (``InfiFPOConfig``) and fused on-policy distillation
(``FusedDistillationConfig``), declared once (docs/methods.md §LN, §Clipping, §Fusion).

"Candidates" are the sources (InfiFPO) or the teachers (OPD); the "frozen pivot" is the initial pivot (InfiFPO's
reference model) or the initial student (OPD). A config class lists ``FusionOptions`` after its TRL base class;
``fusion_kwargs`` is what ``fusion.fuse_reference`` takes, and ``check_fusion_options`` validates them and resolves
``include_pivot``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infifpo import fusion
from infifpo.schema import ConfigError


@dataclass
class FusionOptions:
    """How the candidates' sequence values become one reference f(y) per response (docs/methods.md §Fusion)."""

    fusion_method: str = field(default="max_margin", metadata={
        "help": "How the K candidates' values become one reference f(y) (docs/methods.md §Fusion); paper default "
                "max_margin.", "choices": list(fusion.FUSIONS)})
    length_normalize: bool = field(default=True, metadata={
        "help": "Compare mean per-token log-probs (nats/token; each model divided by its own token count) instead of "
                "sums (nats)."})
    clip: bool = field(default=True, metadata={
        "help": "Clip candidates against the frozen pivot: never below it on chosen, never above it on rejected."})
    include_pivot: bool | None = field(default=None, metadata={
        "help": "Append the frozen pivot as one more fusion candidate (the paper's derivation). Default: false for "
                "mean/confidence/uncertainty (the paper's arms weight the N sources only), true for the max-margin "
                "forms, where it only breaks ties (docs/methods.md §Fusion)."})
    margin_against: str = field(default="init", metadata={
        "help": "max_margin's distance is measured against the frozen pivot ('init') or the current policy "
                "('policy').", "choices": ["init", "policy"]})
    ref_offset: float | None = field(default=None, metadata={
        "help": "Clamp f(y) into [v_r - ref_offset, v_r + ref_offset] (nats, or nats/token with length_normalize; "
                "the official run script's option; off by default)."})

    def check_fusion_options(self, methods: list[str] | None = None, why: str = "") -> None:
        """ConfigError for a fusion_method outside ``methods`` (default: every one) or a bad margin_against; then
        ``include_pivot`` resolved to the method's default when unset."""
        methods = list(fusion.FUSIONS) if methods is None else methods
        if self.fusion_method not in methods:
            raise ConfigError(f"fusion_method={self.fusion_method!r}; choose one of {methods}{why}.")
        if self.margin_against not in ("init", "policy"):
            raise ConfigError(f"margin_against={self.margin_against!r}; choose 'init' or 'policy'.")
        self.include_pivot = fusion.resolve_include_pivot(self.fusion_method, self.include_pivot)

    def fusion_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``fusion.fuse_reference`` these options set."""
        return {"method": self.fusion_method, "clip": self.clip, "include_pivot": self.include_pivot,
                "ref_offset": self.ref_offset, "margin_against": self.margin_against}
