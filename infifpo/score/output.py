"""The outputs of stage `score` on disk: what identifies a model's scores, the per-shard run statistics, and the
assembled scored-pairs output.

Owns: ``model_key`` (a model directory's identity, ``models.model_identity``), ``ShardStats`` and the per-model
``score_stats.json`` (docs/formats.md "Score outputs"), and ``assemble``: joining the per-model outputs by row id into
the scored-pairs format (schema.py: docs/methods.md's official InfiFPO columns plus token counts, model names and,
when every model's output has them, mean entropies).
Does not own: tokenising or running models, or which rows are scored (``infifpo.score.stage``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from infifpo import store
from infifpo.models.resolve import model_files, model_identity
from infifpo.provenance import rows_digest
from infifpo.schema import RESPONSE_COLUMNS, entropy_columns, fuse_columns, ref_columns

logger = logging.getLogger(__name__)

STATS = "score_stats.json"  # docs/formats.md "Score outputs": per-model output dirs and the assembled output dir


def model_key(path: str) -> dict[str, Any]:
    """What determines a model's scores: ``models.model_identity`` (the sha256 of its config, tokenizer and weight
    files) and the per-file digests it is made of (``models.model_files``, which ``trainers.data.same_model``
    compares). Where the directory lies does not matter."""
    return {"identity": model_identity(path), "files": model_files(path)}


class ShardStats:
    """Running totals of one shard's scoring under one model, saved beside its part file after every batch, so a
    killed shard keeps what it did: ``responses`` and response ``tokens`` scored, ``prompt_tokens`` (the prompt is
    forwarded once per response), ``seconds`` of engine forward passes, and ``load_seconds`` (tokenizer, tokenising
    and engine load, the analogue of a training run's setup_s)."""

    FIELDS = ("responses", "tokens", "prompt_tokens", "seconds", "load_seconds")

    def __init__(self, out: store.StageOutput, shard: int, num_shards: int):
        self.path = out.path / f"stats-{shard:05d}-of-{num_shards:05d}.json"
        self.totals = json.loads(self.path.read_text()) if self.path.exists() else dict.fromkeys(self.FIELDS, 0)

    def add(self, **amounts: float) -> None:
        for key, value in amounts.items():
            self.totals[key] += value

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.totals))
        os.replace(tmp, self.path)


def finalize_model(out: store.StageOutput, entry: dict[str, Any]) -> None:
    """Sum every shard's stats into ``score_stats.json``, then finalize. Locked: shards finishing together would
    otherwise race, and the last one in has seen every shard's stats (each saves its own before coming here)."""
    out.path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.path / ".finalize.lock")):
        if out.is_complete():
            return
        totals = dict.fromkeys(ShardStats.FIELDS, 0)
        for f in sorted(out.path.glob("stats-*-of-*.json")):
            for key, value in json.loads(f.read_text()).items():
                totals[key] += value
        ok = sum(r.get("status") == "ok" for f in out.shard_files() for r in store.read_jsonl(f))
        entry = {**entry, **totals, "output": str(out.path)}
        (out.path / STATS).write_text(json.dumps({"models": [entry], "rows": ok}, indent=1))
        out.finalize()


def assemble(rows: list[dict[str, Any]], pivot: str, sources: list[str], outputs: dict[str, store.StageOutput],
             out_root: str | Path) -> Path:
    """Join the per-model outputs by id into the scored-pairs output (schema.py); rows a model dropped are left out.

    Keyed by the per-model outputs (each keyed by its model's identity and the scored texts) and by the full content
    of ``rows``, whose other columns (split, domain, provenance) are copied: other rows are another output."""
    key = {"pivot": [pivot, outputs[pivot].fingerprint], "sources": [[s, outputs[s].fingerprint] for s in sources],
           "pairs": rows_digest(rows)}
    final = store.StageOutput(out_root, "scored", key)
    if final.is_complete():
        return final.path
    final.path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.path / ".assemble.lock")):  # shards that finish together must not both append the rows
        if final.is_complete():
            return final.path
        return _assemble(rows, pivot, sources, outputs, final)


def _assemble(rows: list[dict[str, Any]], pivot: str, sources: list[str], outputs: dict[str, store.StageOutput],
              final: store.StageOutput) -> Path:
    scores = {ref: {r["id"]: r for r in store.read_output(out.path)} for ref, out in outputs.items()}
    result, dropped = [], []
    for row in rows:
        per_model = [scores[ref].get(row["id"]) for ref in [pivot, *sources]]
        if any(s is None or s["status"] != "ok" for s in per_model):
            dropped.append(row["id"])
            continue
        result.append(_scored_row(row, per_model[0], per_model[1:], pivot, sources))
    if dropped:
        logger.warning("score: %d row(s) left out of the scored pairs (dropped by a policy): %s", len(dropped),
                       dropped[:10])
    roles = [(pivot, "pivot"), *((s, "source") for s in sources)]
    models = [_model_stats(outputs[ref], ref, role) for ref, role in roles]
    (final.path / STATS).write_text(json.dumps({"models": models, "rows": len(result)}, indent=1))
    return final.write_all(result)


def _model_stats(out: store.StageOutput, ref: str, role: str) -> dict[str, Any]:
    """The per-model entry of the assembled ``score_stats.json``: as recorded when the model was scored (a cached
    output keeps its numbers), with this job's role; None values for an output written before stats existed."""
    path = out.path / STATS
    entry = json.loads(path.read_text())["models"][0] if path.exists() else dict.fromkeys(ShardStats.FIELDS)
    return {**entry, "model": ref, "role": role, "output": str(out.path)}


def _scored_row(row: dict, ref: dict, srcs: list[dict], pivot: str, sources: list[str]) -> dict[str, Any]:
    out = dict(row)
    for column in RESPONSE_COLUMNS:
        if f"{column}_logps" not in ref:
            continue
        r_sum, r_mean, r_n = ref_columns(column)
        out[r_sum], out[r_n] = ref[f"{column}_logps"], ref[f"{column}_num_tokens"]
        out[r_mean] = out[r_sum] / out[r_n]
        f_sum, f_mean, f_n = fuse_columns(column)
        out[f_sum] = [s[f"{column}_logps"] for s in srcs]
        out[f_n] = [s[f"{column}_num_tokens"] for s in srcs]
        out[f_mean] = [a / n for a, n in zip(out[f_sum], out[f_n], strict=True)]
        if all(f"{column}_mean_entropy" in s for s in (ref, *srcs)):  # the vLLM scorer writes none
            r_entropy, f_entropy = entropy_columns(column)
            out[r_entropy] = ref[f"{column}_mean_entropy"]
            out[f_entropy] = [s[f"{column}_mean_entropy"] for s in srcs]
    out["pivot_model"], out["source_models"] = pivot, list(sources)
    return out
