"""The inherited ``DPOConfig`` options that InfiFPO's and WRPO's losses do not implement, refused by name.

Owns: the list of TRL 1.16 ``DPOConfig`` fields whose non-default value would change TRL's own DPO loss or batch
layout but is not honoured by ``InfiFPOTrainer`` / ``WRPOTrainer`` (their loss is ``fusion.infifpo_loss`` /
``fusion.wrpo_loss``, their collator ``forward.ScoredPreferenceCollator``), and the check that raises ConfigError
instead of training silently on a loss the user did not ask for. Does not own: the configs themselves.
"""

from __future__ import annotations

from typing import Any

from infifpo.schema import ConfigError

# field -> (the default that means "off", what the option does in TRL's DPOTrainer)
IGNORED_DPO_OPTIONS: dict[str, tuple[Any, str]] = {
    "label_smoothing": (0.0, "conservative / robust DPO label smoothing"),
    "ld_alpha": (None, "LD-DPO down-weighting of the verbose tail"),
    "f_divergence_type": ("reverse_kl", "f-divergence DPO"),
    "use_weighting": (False, "WPO weighting of pairs by their probability"),
    "loss_weights": (None, "weights of several combined loss types"),
    "padding_free": (False, "padding-free batches"),
    "sync_ref_model": (False, "TR-DPO reference-model syncing (the reference here is precomputed)"),
}


def refuse_ignored_dpo_options(config: Any, trainer: str) -> None:
    """Raise ConfigError naming every inherited DPO option set away from its default that ``trainer`` ignores."""
    set_ = [(name, getattr(config, name), what) for name, (off, what) in IGNORED_DPO_OPTIONS.items()
            if getattr(config, name, off) != off]
    if set_:
        listed = "; ".join(f"{name}={value!r} ({what})" for name, value, what in set_)
        raise ConfigError(f"{trainer} does not implement the inherited DPOConfig option(s) {listed}: its loss would "
                          "ignore them. Remove them from the config, or use `--method dpo` for TRL's DPO variants.")


def check_truncation_mode(config: Any) -> None:
    """Raise ConfigError for ``truncation_mode`` other than keep_start.

    Rows longer than ``max_length`` are refused (the scores cover the whole response), so no row is ever cut and
    ``keep_end``, which would cut the prompt's start under a reference computed on the whole prompt, is refused.
    """
    if getattr(config, "truncation_mode", "keep_start") != "keep_start":
        raise ConfigError(f"truncation_mode={config.truncation_mode!r} is not supported: rows longer than max_length "
                          "are refused, never cut (the reference covers the whole row). Remove truncation_mode.")
