"""The transformers engine: batched scoring of fixed completions and batched sampling with ``model.generate``.

Owns: loading one causal LM for inference, length-sorted token-budget batching, and the chunked scorer (via
``infifpo.logprobs.masked_token_logprobs``: the decoder backbone once, then the LM head and log-softmax only at the
completion positions, one vocabulary tile at a time, so the (B, T, V) logits never exist). Runs in bf16 where the CPU
(or GPU) has native bf16 matmul, with the logsumexp in fp32. Weights are streamed from safetensors straight into the
target dtype (peak RSS: the bf16 model, never the fp32 checkpoint), and on CPU a long scoring run switches to a
torch.compile'd backbone and head (inductor fuses the elementwise work: norms, rotary, gelu, the fp32 log-softmax).
Does not own: tokenisation or chat templates (``infifpo.logprobs``), files, or which tokens a response is.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.activations import GELUTanh
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from infifpo.backends import Generation, SamplingSpec
from infifpo.logprobs import decoder_backbone, logit_softcap, masked_token_logprobs, masked_token_stats
from infifpo.precision import DEFAULT_SHAPE, auto_cpu_dtype, model_dir_shape
from infifpo.schema import ModelLoadError

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
# Tokens per scoring forward, padding included. Larger batches make bigger matmuls but pad more (requests are
# sorted, so a batch spans a narrower length range when it is smaller); on the 2-core AMX CPU 4096 and 8192 ran at
# the same speed within noise on Gemma-3-270M, and 4096 padded 14 % instead of 23 % (bench/bench_score.py).
DEFAULT_TOKEN_BUDGET = 4096
# On a CUDA device the budget follows free memory (``cuda_token_budget``), between these bounds. On an H100,
# transformers ``generate`` with SmolLM2-135M (32 prompts x 8 samples x 128 tokens, bench/bench_sample.py --device
# cuda) ran at 1684 tok/s with 65536 tokens per batch and 774 tok/s with 16384: small batches leave the GPU idle.
CUDA_TOKEN_BUDGET = 65536
CUDA_MIN_TOKEN_BUDGET = 4096
# Share of the GPU memory free after the model's load that a batch's KV cache and activations may take.
CUDA_MEMORY_SHARE = 0.25
# compile="auto": switch to the compiled scorer once an engine has scored this many tokens (padding included). On 2
# CPU cores (bench/bench_score.py) the compiled forward ran 1.18-1.37x the eager tokens/s after a one-off compile of
# 56-80 s, for ~0.2 GB more RSS, so it pays for itself after roughly 0.2M (Gemma-3-270M) to 0.8M (SmolLM2-135M)
# tokens: a run that has already scored 2**19 tokens is a long one, and the rest of it amortises the compile.
COMPILE_AFTER_TOKENS = 1 << 19
# safetensors dtype names -> torch; anything else (fp8, ...) goes through transformers' own loader.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_READ_BYTES = 1 << 24  # streamed checkpoint reads: 16 MB at a time


def resolve_dtype(dtype: str = "auto", device: str = "cpu", shape: tuple[int, int, int] | None = None) -> str:
    """"bfloat16" or "float32": ``auto`` is bf16 on a GPU that supports it, and on a CPU whichever of the two
    multiplies matrices of ``shape`` (tokens, hidden, intermediate; ``infifpo.precision``) faster, measured once per
    machine and cached."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use 'auto', 'bfloat16' or 'float32'")
        return "bfloat16" if DTYPES[dtype] is torch.bfloat16 else "float32"
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return auto_cpu_dtype(shape or DEFAULT_SHAPE)


def cuda_token_budget(config: Any, free_bytes: int, elem_bytes: int = 2) -> int:
    """Tokens per batch on a CUDA device: as many as fit ``CUDA_MEMORY_SHARE`` of ``free_bytes`` (bytes free after
    the model's load) at the model's KV cache (all layers) plus its widest activations per token, rounded down to a
    multiple of 1024, between ``CUDA_MIN_TOKEN_BUDGET`` and ``CUDA_TOKEN_BUDGET``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    layers = int(getattr(text, "num_hidden_layers", 1) or 1)
    width = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    per_token = elem_bytes * (2 * layers * kv_heads * head_dim + 3 * width + 4 * hidden)
    fit = int(CUDA_MEMORY_SHARE * max(free_bytes, 0) / per_token) // 1024 * 1024
    return max(CUDA_MIN_TOKEN_BUDGET, min(CUDA_TOKEN_BUDGET, fit))


def token_budget_batches(lengths: Sequence[int], token_budget: int) -> Iterator[list[int]]:
    """Indices of requests grouped into batches, longest first, each with ``len(batch) * max_len <= token_budget``
    (a single request longer than the budget gets a batch of its own). Sorting keeps padding waste small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > token_budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _read_safetensors(path: Path, dtype: torch.dtype, out: dict[str, torch.Tensor]) -> bool:
    """Add the tensors of one .safetensors file to ``out``, floating ones converted to ``dtype`` while streaming with
    plain reads (16 MB at a time): neither the whole fp32 tensor nor an mmap of the file is ever resident, so a bf16
    load of an fp32 checkpoint peaks at the bf16 size. False (nothing added) for a dtype this reader does not know."""
    with open(path, "rb", buffering=0) as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        base = f.tell()
        header.pop("__metadata__", None)
        if any(info["dtype"] not in _ST_DTYPES for info in header.values()):
            return False
        buf = bytearray(_READ_BYTES)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            src = _ST_DTYPES[info["dtype"]]
            dst = torch.empty(info["shape"], dtype=dtype if src.is_floating_point else src)
            flat, size = dst.view(-1), torch.empty(0, dtype=src).element_size()
            f.seek(base + info["data_offsets"][0])
            for start in range(0, flat.numel(), _READ_BYTES // size):
                n = min(_READ_BYTES // size, flat.numel() - start)
                if f.readinto(memoryview(buf)[: n * size]) != n * size:
                    raise ValueError(f"{path}: truncated checkpoint (tensor {name!r} ends past the end of the file)")
                flat[start : start + n] = torch.frombuffer(buf, dtype=src, count=n)
            out[name] = dst
    return True


def load_causal_lm(model_dir: str, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """A causal LM in ``dtype`` (eval mode, CPU). Safetensors checkpoints of built-in architectures are streamed into
    ``dtype`` (``_read_safetensors``) and handed to ``from_pretrained(state_dict=...)``, which applies the same key
    renames, weight tying and buffer init as a normal load; anything else (custom code, .bin, fp8, fp32-pinned modules)
    uses ``from_pretrained`` directly, whose peak RSS holds the mmap'd checkpoint plus the converted copy."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None) if not trust_remote_code else None
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        (["model.safetensors"] if (root / "model.safetensors").is_file() else [])
    state: dict[str, torch.Tensor] = {}
    if cls is not None and files and not getattr(cls, "_keep_in_fp32_modules", None) \
            and all(_read_safetensors(root / name, dtype, state) for name in files):
        return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype).eval()
    state.clear()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                low_cpu_mem_usage=True).eval()


class GELUTanhForCompile(GELUTanh):
    """transformers' ``GELUTanh`` (gelu_pytorch_tanh: Gemma), unchanged eagerly; under torch.compile it is written
    x * sigmoid(2z), which equals 0.5 x (1 + tanh z) with z = sqrt(2/pi) (x + 0.044715 x^3), computed in fp32 and
    rounded to the input's dtype as eager does. Inductor's vectorised tanh made the fused gelu-and-multiply of
    Gemma-3-270M's MLP (4096 x 2048 bf16) take 16.7 ms on 2 CPU cores; this form takes 7.5 ms, same bf16 result."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(input)
        x = input.float()
        return (x * torch.sigmoid(math.sqrt(8.0 / math.pi) * (x + 0.044715 * x * x * x))).to(input.dtype)


def use_compile_friendly_gelu(model: torch.nn.Module) -> int:
    """Turn every ``GELUTanh`` of ``model`` that runs ``F.gelu(approximate="tanh")`` into ``GELUTanhForCompile``, in
    place (same module, no weights); returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is GELUTanh and isinstance(module.act, functools.partial):
            module.__class__ = GELUTanhForCompile
            changed += 1
    return changed


def compile_setting(compile: bool | None) -> bool | None:
    """The effective compile choice: an explicit True/False wins, else env ``INFIFPO_COMPILE`` (0/1), else None
    (auto: compile on CPU once ``COMPILE_AFTER_TOKENS`` tokens have been scored)."""
    if compile is not None:
        return bool(compile)
    env = os.environ.get("INFIFPO_COMPILE", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return None


class HFEngine:
    """A transformers causal LM behind the ``Engine`` interface (``infifpo.backends``).

    ``dtype``: "auto" | "bfloat16" | "float32"; ``token_budget``: tokens (padding included) per scoring forward and
    per generate batch (prompt + max new tokens, times samples); None means ``DEFAULT_TOKEN_BUDGET`` on CPU and,
    on a GPU, what ``cuda_token_budget`` fits in the memory left free by the model;
    ``head_chunk``: positions per LM-head chunk over the whole vocabulary (default None: vocabulary tiles of ~2**23
    logits over all positions, ~2x faster; see ``logprobs.head_token_logprobs``);
    ``compile``: torch.compile the decoder backbone (dynamic shapes) and the head's log-sum-exp for scoring. None
    (default) = env ``INFIFPO_COMPILE`` (0/1) if set, else auto: on CPU, once the engine has scored
    ``COMPILE_AFTER_TOKENS`` tokens (a one-off compile of ~1-3 min, then ~1.2-1.4x the eager tokens/s; worth it for
    thousands of responses). On a GPU auto stays eager; ``INFIFPO_COMPILE=1`` compiles there from the first batch
    (H100, Gemma-3-270M: 2.1x the eager tokens/s after a ~35 s compile, so for runs of ~10M tokens and more). A compile
    failure (no C++ compiler, unsupported model) logs a warning and scores eagerly. ``compile_head``: compile only
    the chunked log-softmax, from the first call.
    The tokenizer is loaded on first use (sampling needs it, scoring token ids does not): ~0.4 GB for Gemma-3.
    """

    def __init__(self, model_dir: str, *, dtype: str = "auto", device: str = "cpu",
                 token_budget: int | None = None, head_chunk: int | None = None,
                 trust_remote_code: bool = False, threads: int | None = None, compile_head: bool = False,
                 compile: bool | None = None):
        self.model_dir = str(model_dir)
        self.dtype = resolve_dtype(dtype, device, model_dir_shape(self.model_dir))
        self.device = torch.device(device)
        self.token_budget = int(token_budget or DEFAULT_TOKEN_BUDGET)  # on CUDA: set from free memory after the load
        self.head_chunk = head_chunk
        self.compile_head = compile_head
        self.compile = compile_setting(compile)
        self.trust_remote_code = trust_remote_code
        self.tokens_scored = 0  # padding included; drives compile="auto"
        self._compiled_backbone: torch.nn.Module | None = None
        self._compile_failed = False
        self._tokenizer = None
        if threads:
            torch.set_num_threads(threads)
        try:
            self.model = load_causal_lm(self.model_dir, DTYPES[self.dtype], trust_remote_code).to(self.device)
            decoder_backbone(self.model)
        except Exception as e:
            raise ModelLoadError(
                f"model {self.model_dir!r} could not be loaded with transformers ({type(e).__name__}: {e}). Check "
                "that it is a causal-LM checkpoint directory (config.json, weights, tokenizer); a model with custom "
                "code needs trust_remote_code=True, which runs code shipped with the model."
            ) from e
        if not token_budget and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.token_budget = cuda_token_budget(self.model.config, free, DTYPES[self.dtype].itemsize)
            logger.info("%s: %d tokens per batch (%.1f GB free on %s)", self.model_dir, self.token_budget,
                        free / 2**30, self.device)
        use_compile_friendly_gelu(self.model)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.max_length = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self._check_head()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first access."""
        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir,
                                                                trust_remote_code=self.trust_remote_code)
            except Exception as e:
                raise ModelLoadError(f"model {self.model_dir!r}: its tokenizer could not be loaded "
                                     f"({type(e).__name__}: {e}); sampling needs tokenizer.json / "
                                     "tokenizer_config.json in the model directory.") from e
        return self._tokenizer

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Per-token raw log-probs (nats, T = 1) of each completion given its prompt, in request order."""
        return self._score(prompt_ids, completion_ids, entropy=False)[0]

    def score_with_entropy(self, prompt_ids: list[list[int]],
                           completion_ids: list[list[int]]) -> tuple[list[list[float]], list[list[float]] | None]:
        """(``score``'s per-token log-probs, the per-token entropies of the model's next-token distribution at the
        same positions), nats, from the same vocabulary-tiled pass (``logprobs.head_token_stats``)."""
        return self._score(prompt_ids, completion_ids, entropy=True)

    @torch.inference_mode()
    def _score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
               entropy: bool) -> tuple[list[list[float]], list[list[float]] | None]:
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            if not p:
                raise ValueError(f"request {i}: empty prompt; the first completion token needs a context token")
            ids = list(p) + list(c)
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"request {i}: a token id is outside the model's vocabulary [0, {self.vocab_size}) "
                                 f"(min {min(ids)}, max {max(ids)}); were these ids made with another tokenizer?")
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        results: list[list[float]] = [[] for _ in prompt_ids]
        entropies: list[list[float]] = [[] for _ in prompt_ids]
        for batch in token_budget_batches(lengths, self.token_budget):
            flat, flat_h = self._score_batch([prompt_ids[i] for i in batch], [completion_ids[i] for i in batch],
                                             entropy)
            for k, i in enumerate(batch):
                results[i] = flat[k]
                if flat_h is not None:
                    entropies[i] = flat_h[k]
        return results, (entropies if entropy else None)

    def _score_batch(self, prompts: list[list[int]], completions: list[list[int]],
                     entropy: bool = False) -> tuple[list[list[float]], list[list[float]] | None]:
        width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        score_mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            input_ids[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
            score_mask[b, len(p) : len(p) + len(c)] = True
        self.tokens_scored += input_ids.numel()
        # Right padding with no attention mask is exact: causal attention never lets the trailing pads reach a real
        # token, and it keeps SDPA on its is_causal fast path.
        input_ids, score_mask = input_ids.to(self.device), score_mask.to(self.device)
        stats = None
        if self._wants_compile(len(prompts)):
            try:
                stats = masked_token_stats(self.model, input_ids, score_mask, chunk_size=self.head_chunk,
                                           compiled=True, backbone=self._backbone_compiled(), entropy=entropy)
            except Exception as e:  # inductor raises many types (no compiler, unsupported op); eager is always right
                self._compile_failed = True
                logger.warning("%s: torch.compile'd scoring failed (%s: %s); scoring eagerly instead. Set "
                               "INFIFPO_COMPILE=0 (or compile=False) to skip the attempt.", self.model_dir,
                               type(e).__name__, " ".join(str(e).split())[:400])
        if stats is None:
            stats = masked_token_stats(self.model, input_ids, score_mask, chunk_size=self.head_chunk,
                                       compiled=self.compile_head and not self._compile_failed, entropy=entropy)
        sizes = [len(c) for c in completions]
        logps, entropies = (None if t is None else [chunk.tolist() for chunk in t.cpu().split(sizes)] for t in stats)
        return logps, entropies

    def _wants_compile(self, batch_size: int) -> bool:
        """Compiled scoring for this batch? Never after a failure; batches of one stay eager (dynamo would specialise
        and recompile for size 1); auto = CPU and ``COMPILE_AFTER_TOKENS`` scored."""
        if self._compile_failed or self.compile is False or batch_size < 2:
            return False
        return self.compile is True or (self.device.type == "cpu" and self.tokens_scored >= COMPILE_AFTER_TOKENS)

    def _backbone_compiled(self) -> torch.nn.Module:
        if self._compiled_backbone is None:
            logger.info("%s: torch.compile of the decoder backbone and head (one-off, ~1-2 min on CPU)",
                        self.model_dir)
            # emulate_precision_casts keeps eager's bf16 roundings between fused ops: without it Gemma-3-270M's
            # bf16 scores drifted 0.023 nats/token from fp32 (eager: 0.015; max per sequence 81 vs 31 nats).
            self._compiled_backbone = torch.compile(decoder_backbone(self.model), dynamic=True,
                                                    options={"emulate_precision_casts": True})
        return self._compiled_backbone

    @torch.inference_mode()
    def _check_head(self) -> None:
        """Refuse a model whose forward post-processes logits in a way the chunked head does not reproduce
        (e.g. Cohere's logit_scale, Granite's logits_scaling): compare with the model's own forward on 8 tokens."""
        ids = torch.arange(1, 9).remainder(self.vocab_size)[None].to(self.device)
        ours = masked_token_logprobs(self.model, ids, torch.arange(8, device=self.device)[None] > 0)
        logits = self.model(input_ids=ids, use_cache=False).logits.float()
        theirs = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        # Mean over positions: bf16 logits may round differently in the two matmul shapes (one ulp is 0.125 at 20),
        # which averages out, while a missing scale or cap shifts every position.
        tol = 1e-3 if self.dtype == "float32" else 0.1
        diff = (ours.cpu() - theirs.cpu()).abs().mean().item()
        logger.debug("%s: chunked head vs forward, mean abs diff %.3g nats", self.model_dir, diff)
        if not diff <= tol:
            raise ModelLoadError(
                f"model {self.model_dir!r} ({type(self.model).__name__}): the chunked scorer disagrees with the "
                f"model's forward by {diff:.3g} nats (softcap={logit_softcap(self.model.config)}); its forward "
                "post-processes logits in a way infifpo does not replicate. Use the vllm backend for it."
            )

    # ------------------------------------------------------------------------------------------------ sampling
    def stop_ids(self) -> list[int]:
        """Token ids that end a generation: the generation config's eos list (end-of-turn ids) and the tokenizer's
        eos."""
        eos = self.model.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[list[Generation]]:
        """``spec.n`` samples per prompt (left-padded batches of prompts), each with the raw T = 1 summed log-prob
        of its tokens (re-scored with ``score``). Seeded with ``spec.seed`` once per call: identical calls give
        identical samples, but a different batching of the same prompt can give different ones."""
        stops = self.stop_ids()
        if not stops:
            raise ModelLoadError(f"model {self.model_dir!r}: no eos / end-of-turn token id in its generation config "
                                 "or tokenizer, so generation could only stop at max_tokens.")
        pad_id = self.model.generation_config.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        torch.manual_seed(spec.seed)
        lengths = [(len(p) + spec.max_tokens) * spec.n for p in prompt_ids]
        out: list[list[Generation]] = [[] for _ in prompt_ids]
        for batch in token_budget_batches(lengths, max(self.token_budget, max(lengths, default=1))):
            for i, gens in zip(batch, self._generate_batch([prompt_ids[i] for i in batch], spec, stops, pad_id),
                               strict=True):
                out[i] = gens
        flat = [g for gens in out for g in gens]
        logps = self.score([prompt_ids[i] for i, gens in enumerate(out) for _ in gens], [g.token_ids for g in flat])
        for g, lp in zip(flat, logps, strict=True):
            g.logp = math.fsum(lp)
        return out

    def _generate_batch(self, prompts: list[list[int]], spec: SamplingSpec, stops: list[int],
                        pad_id: int) -> list[list[Generation]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[b, width - len(p):] = 1
        sampled = spec.temperature > 0
        seqs = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            do_sample=sampled, temperature=spec.temperature if sampled else None,
            top_p=spec.top_p if sampled else None, top_k=0 if sampled else None, max_new_tokens=spec.max_tokens,
            num_return_sequences=spec.n, eos_token_id=stops, pad_token_id=pad_id,
        )[:, width:].cpu().tolist()
        gens = [self._to_generation(s, stops) for s in seqs]
        return [gens[b * spec.n : (b + 1) * spec.n] for b in range(len(prompts))]

    def _to_generation(self, seq: list[int], stops: list[int]) -> Generation:
        """Cut a generated row after its first stop token (kept) or keep it whole (finish_reason "length")."""
        end = next((j for j, t in enumerate(seq) if t in stops), None)
        ids = seq if end is None else seq[: end + 1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(token_ids=ids, text=text, finish_reason="length" if end is None else "stop", logp=0.0)

    def close(self) -> None:
        """Drop the model so its memory can be returned before the next engine loads (the caller may gc.collect)."""
        self.model = None
        self._compiled_backbone = None
