"""Which tokens a response is, under each model's own tokenizer and chat template.

Owns: the prompt/response token split shared by every stage that needs it (sample encodes prompts with it, score
scores the spans it returns, the OPD trainer scores teachers with it). The rule is TRL 1.16's for conversational
data (methods.md, "Response tokens"): the completion is the suffix of template(prompt + response) after its common
prefix with template(prompt, add_generation_prompt=True), ending with the template's end-of-turn token; when a row
has several responses the prompt length is the minimum common prefix over all of them, exactly as DPOTrainer does.
Does not own: running models (``backends``) or what the numbers are used for (``fusion``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infifpo.schema import ChatTemplateError

Messages = list[dict[str, str]]


def _chat_ids(tokenizer: Any, messages: Messages, **kwargs: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "?")
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat_template. Pass one (infifpo.models gives packaged base models a "
            "documented plain template) instead of relying on a silent plain-text fallback."
        )
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as e:  # jinja raises TemplateError, some templates raise on role order
        raise ChatTemplateError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} rejected the conversation "
            f"(roles {[m.get('role') for m in messages]}): {e}"
        ) from e
    return list(out["input_ids"])


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of ``prompt`` rendered with the chat template and the generation prompt (what a model samples from)."""
    return _chat_ids(tokenizer, prompt, add_generation_prompt=True)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def response_spans(tokenizer: Any, prompt: Messages, responses: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Split ``prompt + [assistant: r]`` for every r in ``responses`` into (shared prompt ids, completion ids per r).

    Completion ids are exactly the tokens TRL's DPOTrainer sums over for conversational rows (including the
    template's end-of-turn token). Raises ChatTemplateError if a completion comes out empty.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = [_chat_ids(tokenizer, prompt + [{"role": "assistant", "content": r}]) for r in responses]
    prompt_len = min([len(prompt_ids)] + [common_prefix_length(prompt_ids, f) for f in full])
    completions = [f[prompt_len:] for f in full]
    for r, c in zip(responses, completions, strict=True):
        if not c:
            raise ChatTemplateError(
                f"response {r[:40]!r} has no tokens under {getattr(tokenizer, 'name_or_path', '?')!r}'s chat template"
            )
    return prompt_ids[:prompt_len], completions
