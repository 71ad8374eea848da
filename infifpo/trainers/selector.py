"""`infifpo selector`: train the ASN selector of `learned` fusion on a held-out slice of scored pairs, and load it.

docs/methods.md §ASN. Owns: the selector options (``SelectorOptions``, `infifpo selector --help`), the seeded selector
slice of the scored PO pairs, the features of scored-pair rows (``FeatureSpec``, ``row_tensors``), the selector
stage output and its checkpoint, and what InfiFPOTrainer needs from it (``load_selector``: the frozen network, the
pool check, the held-out ids to drop, each pair's weights). Does not own: the network, its loss and the fitting loop
(``infifpo.selector``, pure torch), or fusing with the weights (``fusion.fuse_learned``).

Output ``<out>/selector-<fp>/`` (``store.StageOutput``; fp keys the scored pairs' digest and every option): rows, one
per held-out pair (``id``, ``domain``, ``weights`` p̂ [K'] of the trained selector, ``fused_margin`` f(y_w) − f(y_l));
``selector.pt`` (the network's state_dict); ``selector.json`` (pool, feature spec, options, training curve per step,
per-source importance, agreement with the judge on the slice and on the other PO pairs), both written before
``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset

from infifpo import selector as asn
from infifpo.config import parse_config
from infifpo.provenance import output_digest
from infifpo.schema import (
    DOMAINS,
    ConfigError,
    ScoredPairsError,
    SelectorError,
    entropy_columns,
    fuse_columns,
    ref_columns,
    row_label,
)
from infifpo.store import StageOutput, announce, read_output
from infifpo.trainers.data import implied_token_count, validate_preference_rows

logger = logging.getLogger(__name__)
SELECTOR_VERSION = 1
CHECKPOINT, META = "selector.pt", "selector.json"
WEIGHTS_COLUMN = "selector_weights"  # the per-pair p̂ [K'] InfiFPOTrainer adds to its dataset
RESPONSES = ("chosen", "rejected")


@dataclass
class SelectorOptions:
    """The options of `infifpo selector` (``--config FILE`` and flags, ``infifpo.config``); docs/methods.md §ASN."""

    scored: str = field(metadata={"help": "the scored-pairs stage output (`infifpo score`) to hold the slice out of"})
    fraction: float = field(default=0.1, metadata={
        "help": "share of the scored PO pairs held out to train the selector (dropped from InfiFPO's rows)"})
    tau: float = field(default=0.15, metadata={"help": "selection threshold τ on the softmax (argmax if none pass)"})
    lambda_feed: float = field(default=0.5, metadata={"help": "weight λ_feed of the CV² feedback loss (0: none)"})
    feedback: Literal["batch", "per_sample"] = field(default="batch", metadata={
        "help": "CV² of the batch-wise importance I_k = Σ_pairs p̂_k, or per pair averaged (the paper's Eq. 9)"})
    beta_s: float = field(default=1.0, metadata={"help": "β_s of the selector's preference loss"})
    length_normalize: bool = field(default=True, metadata={
        "help": "features and fusion on mean per-token log-probs (InfiFPO's length_normalize must match)"})
    clip: bool = field(default=True, metadata={"help": "clip the sources against the frozen pivot (InfiFPO's clip "
                                                       "must match)"})
    include_pivot: bool = field(default=False, metadata={
        "help": "the frozen pivot is one more candidate (InfiFPO's include_pivot must match)"})
    epochs: int = field(default=100, metadata={"help": "passes over the selector slice"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step (the batch of the batch-wise CV²)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    seed: int = field(default=0, metadata={"help": "seed of the slice, the initialisation and the batch order"})
    out: str = field(default="runs", metadata={"help": "root directory of stage outputs"})

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"fraction={self.fraction}: the selector slice must be a share in (0, 1) of the PO "
                              "pairs (InfiFPO trains on the rest).")
        if not 0.0 <= self.tau < 1.0:
            raise ConfigError(f"tau={self.tau}: the selection threshold must be in [0, 1).")
        if not self.lambda_feed >= 0 or not self.beta_s > 0:
            raise ConfigError(f"lambda_feed={self.lambda_feed}, beta_s={self.beta_s}: need lambda_feed >= 0 and "
                              "beta_s > 0.")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}: need epochs >= 1, "
                              "batch_size >= 1, lr > 0.")

    def training(self) -> asn.SelectorTraining:
        """The fitting options of ``selector.fit_selector``."""
        return asn.SelectorTraining(tau=self.tau, beta_s=self.beta_s, lambda_feed=self.lambda_feed,
                                    feedback=self.feedback, epochs=self.epochs, batch_size=self.batch_size,
                                    lr=self.lr, seed=self.seed)

    def keyed(self) -> dict[str, Any]:
        """Every option that determines the output besides the scored pairs themselves."""
        return {k: v for k, v in asdict(self).items() if k not in ("scored", "out")}


@dataclass
class FeatureSpec:
    """What the selector's features are made of; recorded with the checkpoint and checked where it is used."""

    sources: list[str]
    pivot_model: str | None
    length_normalize: bool
    clip: bool
    include_pivot: bool
    entropy: bool
    domains: list[str]

    @property
    def candidates(self) -> list[str]:
        return list(self.sources) + (["pivot"] if self.include_pivot else [])

    @property
    def feature_names(self) -> list[str]:
        """Per-candidate feature names, in ``selector.pair_features``' order."""
        value = "mean_logps" if self.length_normalize else "logps"
        names = [f"c_chosen_{value}", f"c_rejected_{value}"]
        names += ["chosen_mean_entropy", "rejected_mean_entropy"] if self.entropy else []
        return names + ["log_chosen_num_tokens", "log_rejected_num_tokens"] + [f"domain={d}" for d in self.domains]


def _token_counts(i: int, row: dict[str, Any], response: str, k: int) -> tuple[list[float], float]:
    """(sources' [K], pivot's) token counts of ``response``: the count columns, or sum / mean (official format)."""
    (r_sum, r_mean, r_n), (s_sum, s_mean, s_n) = ref_columns(response), fuse_columns(response)
    src = row.get(s_n) or [implied_token_count(s, m) for s, m in zip(row[s_sum], row[s_mean], strict=True)]
    ref = row.get(r_n) or implied_token_count(row[r_sum], row[r_mean])
    if len(src) != k or not all(isinstance(n, int | float) and n >= 1 for n in [*src, ref]):
        raise ScoredPairsError(f"{row_label(i, row)}: the learned selector needs every model's token count of "
                               f"{response!r} (log m_k is a feature): add {s_n!r}/{r_n!r} (`infifpo score` writes "
                               "them) or the sums and means they follow from.")
    return [float(n) for n in src], float(ref)


def _entropies(i: int, row: dict[str, Any], response: str, include_pivot: bool) -> list[float]:
    ref_col, src_col = entropy_columns(response)
    values = list(row.get(src_col) or []) + ([row.get(ref_col)] if include_pivot else [])
    if not values or not all(isinstance(v, int | float) and math.isfinite(v) and v >= -1e-4 for v in values):
        raise SelectorError(f"{row_label(i, row)}: the selector was trained with entropy features, but {src_col!r}"
                            f"{f' / {ref_col!r}' if include_pivot else ''} is missing or not a finite mean entropy >= "
                            "0. Score the pairs with the transformers scorer, or train the selector on pairs without "
                            "entropy columns.")
    return [max(float(v), 0.0) for v in values]


def has_entropy(rows: Sequence[dict[str, Any]], include_pivot: bool) -> bool:
    """Whether every row has the entropy columns of both responses (sources, and the pivot when a candidate)."""
    cols = [entropy_columns(r)[1] for r in RESPONSES] + ([entropy_columns(r)[0] for r in RESPONSES]
                                                          if include_pivot else [])
    return bool(rows) and all(row.get(c) is not None for row in rows for c in cols)


def row_tensors(rows: Sequence[dict[str, Any]], spec: FeatureSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [N, K', d], c(y_w) [N, K'], c(y_l) [N, K']) of validated scored-pair rows (docs/methods.md §ASN)."""
    pick = 1 if spec.length_normalize else 0
    k = len(spec.sources)
    cols: dict[str, list[Any]] = {name: [] for name in ("ref_w", "ref_l", "src_w", "src_l", "n_w", "n_l", "h_w",
                                                         "h_l", "domain")}
    for i, row in enumerate(rows):
        for r, tag in zip(RESPONSES, ("w", "l"), strict=True):
            cols[f"ref_{tag}"].append(float(row[ref_columns(r)[pick]]))
            cols[f"src_{tag}"].append([float(v) for v in row[fuse_columns(r)[pick]]])
            src_n, ref_n = _token_counts(i, row, r, k)
            cols[f"n_{tag}"].append(src_n + ([ref_n] if spec.include_pivot else []))
            if spec.entropy:
                cols[f"h_{tag}"].append(_entropies(i, row, r, spec.include_pivot))
        domain = row.get("domain")
        cols["domain"].append([1.0 if domain == d else 0.0 for d in spec.domains])
    t = {name: torch.tensor(v, dtype=torch.float64) for name, v in cols.items() if v}
    cand_w, cand_l = asn.candidate_values(t["ref_w"], t["ref_l"], t["src_w"], t["src_l"], clip=spec.clip,
                                          include_pivot=spec.include_pivot)
    features = asn.pair_features(cand_w, cand_l, t["n_w"].log(), t["n_l"].log(), t["domain"],
                                 t.get("h_w"), t.get("h_l"))
    return features, cand_w.float(), cand_l.float()


def selector_slice(ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The held-out ids: a seeded sample of round(fraction·N) of the ``ids`` (at least 1, at most N − 1)."""
    ids = sorted(ids)
    if len(ids) < 2:
        raise ScoredPairsError(f"{len(ids)} PO pair(s): the selector needs a slice of them and InfiFPO the rest; "
                               "score more pairs.")
    n = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    return set(random.Random(seed).sample(ids, n))


def _po_rows(scored: str, length_normalize: bool) -> list[dict[str, Any]]:
    rows = read_output(scored)
    po = [row for row in rows if row.get("split", "po") == "po"]
    if not po:
        raise ScoredPairsError(f"{scored}: no PO rows (split == 'po') to hold a selector slice out of.")
    if any("id" not in row for row in po):
        raise ScoredPairsError(f"{scored}: rows without an 'id'; the held-out slice is recorded by id.")
    validate_preference_rows(Dataset.from_list(po), responses=RESPONSES, length_normalize=length_normalize,
                             sources=True)
    return po


def _importance(weights: torch.Tensor, names: list[str]) -> dict[str, float]:
    return dict(zip(names, weights.mean(dim=0).tolist(), strict=True)) if len(weights) else {}


def _agreement(weights: torch.Tensor, cand_w: torch.Tensor, cand_l: torch.Tensor) -> float | None:
    if not len(weights):
        return None
    return float((((weights * cand_w).sum(dim=1) - (weights * cand_l).sum(dim=1)) > 0).float().mean())


def train_selector(scored_dir: str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Train (or reuse) the selector of the scored pairs ``scored_dir``; returns ``<out_dir>/selector-<fp>``.

    ``options``: the fields of ``SelectorOptions`` (fraction 0.1, tau 0.15, lambda_feed 0.5, feedback "batch", ...).
    The slice is a seeded ``fraction`` of the PO pairs; the rest are InfiFPO's rows, on which the trained selector's
    importance and agreement with the judge are recorded too (a check the selector never trained on).
    """
    opts = SelectorOptions(scored=str(scored_dir), out=str(out_dir), **options)
    key = {"stage": "selector", "version": SELECTOR_VERSION, "scored": output_digest(opts.scored), **opts.keyed()}
    out = StageOutput(opts.out, "selector", key).lock()
    if out.is_complete():
        logger.info("selector already trained for these inputs; reusing %s", out.path)
        return out.path
    rows = _po_rows(opts.scored, opts.length_normalize)
    held = selector_slice([row["id"] for row in rows], opts.fraction, opts.seed)
    first = rows[0]
    spec = FeatureSpec(sources=list(first["source_models"]) if first.get("source_models") else
                       [f"src{j}" for j in range(len(first[fuse_columns("chosen")[0]]))],
                       pivot_model=first.get("pivot_model"), length_normalize=opts.length_normalize, clip=opts.clip,
                       include_pivot=opts.include_pivot, entropy=has_entropy(rows, opts.include_pivot),
                       domains=list(DOMAINS))
    slice_rows = [row for row in rows if row["id"] in held]
    rest_rows = [row for row in rows if row["id"] not in held]
    features, cand_w, cand_l = row_tensors(slice_rows, spec)
    net, curve = asn.fit_selector(features, cand_w, cand_l, opts.training())
    weights = asn.selector_weights(net, features, opts.tau)
    rest = row_tensors(rest_rows, spec)
    rest_weights = asn.selector_weights(net, rest[0], opts.tau)
    names = spec.candidates
    by_domain = {d: _importance(weights[torch.tensor([str(row.get("domain")) == d for row in slice_rows])], names)
                 for d in sorted({str(row.get("domain")) for row in slice_rows})}
    meta = {
        "format": SELECTOR_VERSION, "scored": opts.scored, "scored_digest": key["scored"],
        "sources": spec.sources, "pivot_model": spec.pivot_model, "candidates": names,
        "features": {**asdict(spec), "per_candidate": spec.feature_names},
        "options": opts.keyed(), "held_out": {"pairs": len(slice_rows), "of_po_pairs": len(rows)},
        "importance": _importance(weights, names), "importance_by_domain": by_domain,
        "importance_training_rows": _importance(rest_weights, names),
        "agreement": _agreement(weights, cand_w, cand_l),
        "agreement_training_rows": _agreement(rest_weights, rest[1], rest[2]),
        "curve": curve,
    }
    out.path.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out.path / CHECKPOINT)
    (out.path / META).write_text(json.dumps(meta, indent=1))  # both before _SUCCESS: complete => has the checkpoint
    margins = ((weights * cand_w).sum(dim=1) - (weights * cand_l).sum(dim=1)).tolist()
    out.write_all({"id": row["id"], "domain": row.get("domain"), "weights": w, "fused_margin": m}
                  for row, w, m in zip(slice_rows, weights.tolist(), margins, strict=True))
    return out.path


# ---------------------------------------------------------------- using a trained selector (InfiFPOTrainer)


@dataclass
class Selector:
    """A trained selector, frozen: its network, feature spec, τ and the ids of the pairs it was trained on."""

    path: Path
    net: asn.SelectorNet
    spec: FeatureSpec
    tau: float
    held_out: set[str]

    def check_options(self, *, length_normalize: bool, clip: bool, include_pivot: bool) -> None:
        """SelectorError unless the trainer's fusion options are the ones the selector's features were made with."""
        ours = {"length_normalize": length_normalize, "clip": clip, "include_pivot": include_pivot}
        theirs = {k: getattr(self.spec, k) for k in ours}
        if ours != theirs:
            diff = ", ".join(f"{k}: {theirs[k]} (selector) vs {ours[k]}" for k in ours if ours[k] != theirs[k])
            raise SelectorError(f"{self.path}: the selector was trained with other fusion options than this run's "
                                f"({diff}); its features would mean something else. Set them as the selector's, or "
                                "retrain it with `infifpo selector` and these options.")

    def check_pool(self, dataset: Dataset) -> None:
        """SelectorError unless the rows list the selector's sources, in its order, and were scored with its pivot."""
        if "source_models" not in dataset.column_names or len(dataset) == 0:
            raise SelectorError(f"{self.path}: the rows have no source_models column, so the selector's pool "
                                f"{self.spec.sources} cannot be checked; train on the scored pairs of "
                                "`infifpo score`.")
        names = list(dataset[0]["source_models"])
        pivots = set(dataset["pivot_model"]) if "pivot_model" in dataset.column_names else {None}
        fix = (" Train a selector on these scored pairs (`infifpo selector --scored DIR`), or give the scored pairs "
               "it was trained on.")
        if names != self.spec.sources:
            raise SelectorError(f"{self.path}: the selector was trained on sources {self.spec.sources} (in that "
                                f"order), but these rows fuse {names} (after fusion_sources); its weights are per "
                                f"candidate position, so they would go to the wrong source.{fix}")
        if pivots != {self.spec.pivot_model}:
            raise SelectorError(f"{self.path}: the selector was trained on pairs scored with pivot "
                                f"{self.spec.pivot_model!r}, but these rows' pivot_model is "
                                f"{sorted(map(str, pivots))}; its clipped features are relative to that pivot.{fix}")

    def drop_held_out(self, dataset: Dataset) -> Dataset:
        """``dataset`` without the pairs the selector was trained on (docs/methods.md §ASN: never trained on twice)."""
        if "id" not in dataset.column_names:
            raise SelectorError(f"{self.path}: the rows have no 'id' column, so the selector's held-out pairs cannot "
                                "be dropped; train on the scored pairs of `infifpo score`.")
        kept = dataset.filter(lambda i: i not in self.held_out, input_columns="id")
        logger.info("learned fusion: dropped %d of %d rows held out to train the selector %s",
                    len(dataset) - len(kept), len(dataset), self.path)
        if len(kept) == 0:
            raise SelectorError(f"{self.path}: every row was in the selector's slice; nothing left to train on.")
        return kept

    def add_weights(self, dataset: Dataset) -> Dataset:
        """``dataset`` with ``WEIGHTS_COLUMN``: each pair's p̂ [K'] under the frozen selector (validated rows)."""
        rows = dataset.remove_columns([c for c in dataset.column_names if c.endswith("_ids")]).to_list()
        weights = asn.selector_weights(self.net, row_tensors(rows, self.spec)[0], self.tau)
        return dataset.add_column(WEIGHTS_COLUMN, weights.tolist())


def load_selector(path: str | Path) -> Selector:
    """The frozen selector of an `infifpo selector` output; SelectorError when ``path`` is not one."""
    path = Path(path)
    if not (path / META).is_file() or not (path / CHECKPOINT).is_file():
        raise SelectorError(f"{path}: not a selector output (no {META} / {CHECKPOINT}); give the directory "
                            "`infifpo selector --scored DIR` printed.")
    held_out = {row["id"] for row in read_output(path)}
    meta = json.loads((path / META).read_text())
    spec = FeatureSpec(**{k: v for k, v in meta["features"].items() if k != "per_candidate"})
    net = asn.SelectorNet(len(spec.candidates), len(spec.feature_names))
    net.load_state_dict(torch.load(path / CHECKPOINT, weights_only=True))
    net.eval().requires_grad_(False)
    return Selector(path, net, spec, float(meta["options"]["tau"]), held_out)


def check_learned_options(fusion_method: str, selector_path: str | None, loss_type: str) -> None:
    """ConfigError for `learned` without a selector, a selector without `learned`, or `learned` with the WRPO loss."""
    if fusion_method == "learned" and not selector_path:
        raise ConfigError("fusion_method=learned needs selector_path: the output of `infifpo selector --scored DIR` "
                          "(docs/methods.md §ASN), trained on the same scored pairs before InfiFPO.")
    if selector_path and fusion_method != "learned":
        raise ConfigError(f"selector_path is read by fusion_method=learned only, not {fusion_method!r}; drop it or "
                          "set fusion_method: learned.")
    if fusion_method == "learned" and loss_type == "wrpo":
        raise ConfigError("fusion_method=learned weighs (chosen, rejected) pairs; the InfiFPO-WRPO variant "
                          "(loss_type=wrpo) would fuse (source_chosen, rejected) with weights it was not trained for.")


def main(argv: list[str] | None = None) -> int:
    """`infifpo selector --scored DIR [--fraction 0.1 --tau 0.15 --lambda_feed 0.5 ...] [--out ROOT]`."""
    opts = parse_config(SelectorOptions, argv, prog="infifpo selector",
                        description="Train the ASN selector of learned fusion on a held-out slice of scored pairs.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = train_selector(opts.scored, opts.out, **{k: v for k, v in asdict(opts).items() if k not in ("scored",
                                                                                                      "out")})
    meta = json.loads((path / META).read_text())
    importance = "  ".join(f"{k}={v:.3f}" for k, v in meta["importance"].items())
    announce(path, summary=f"selector: {meta['held_out']['pairs']} of {meta['held_out']['of_po_pairs']} PO pairs "
                           f"held out; importance {importance}; agreement with the judge "
                           f"{meta['agreement']:.3f} (slice), {meta['agreement_training_rows']:.3f} (other PO pairs)")
    return 0
