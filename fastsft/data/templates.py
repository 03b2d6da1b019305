"""Rendering canonical examples (see formats.py) to text with trained character spans.

A `Rendered` is a list of pieces, each tokenized on its own, with the character spans of each piece
whose tokens are trained, plus whether a trained EOS id follows:

    alpaca / prompt_completion   [(prompt, []), (response, [whole])] + EOS
    text                         [(text, [whole])] + EOS
    sharegpt / messages          [(whole conversation, [assistant spans])] (+ EOS, ChatML fallback only)

Prompt and response are tokenized separately so the prompt tokens are exactly what generation
sees. Conversations are rendered with the model's own chat template (ChatML when it has none) and
each trained assistant span is found by rendering prefixes: it runs from the end of ``messages[:i]``
rendered with the generation prompt to the end of ``messages[:i+1]`` (the assistant text plus the
template's end-of-turn marker, minus trailing whitespace and minus a leading empty ``<think>``
block). No ``{% generation %}`` markers are needed. A template whose prefixes are not prefixes of
the longer renderings (it rewrites earlier turns), or that renders an assistant turn without its
text, makes the record an error (RecordError with the reason) -- never a silently mis-masked one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import RecordError
from .tokenizer import IM_END, Tokenizer

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TRAIN_ON = ("all", "last")


@dataclass
class Rendered:
    pieces: list[tuple[str, list[tuple[int, int]]]] = field(default_factory=list)
    append_eos: bool = False  # a trained EOS id after the last piece


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt (the no-input variant when `input` is empty or blank)."""
    if input and input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def chatml_appends_eos(tokenizer: Tokenizer) -> bool:
    """ChatML fallback on a tokenizer without a `<|im_end|>` token: `<|im_end|>` is then plain
    text, so an EOS id after the last assistant turn gives generation a single stop token."""
    return not tokenizer.has_chat_template and tokenizer.token_to_id(IM_END) is None


def render_example(example: dict, fmt: str, tokenizer: Tokenizer, train_on: str = "all") -> Rendered:
    if fmt == "alpaca":
        prompt = alpaca_prompt(example["instruction"], example["input"])
        return _prompt_response(prompt, example["output"])
    if fmt == "prompt_completion":
        return _prompt_response(example["prompt"], example["completion"])
    if fmt == "text":
        text = example["text"]
        return Rendered([(text, [(0, len(text))])], append_eos=True)
    if fmt in ("sharegpt", "messages"):
        text, spans, eos = render_conversation(example["messages"], tokenizer, train_on)
        return Rendered([(text, spans)], append_eos=eos)
    raise RecordError(f"unknown format {fmt!r}")


def _prompt_response(prompt: str, response: str) -> Rendered:
    return Rendered([(prompt, []), (response, [(0, len(response))])], append_eos=True)


def prompt_text(example: dict, fmt: str, tokenizer: Tokenizer) -> str:
    """The text a model is given at generation time for `example` (everything before the first
    trained token of the response; for conversations, everything before the last assistant turn's
    trained span: the generation prompt, plus an empty think block when the template writes one)."""
    if fmt == "alpaca":
        return alpaca_prompt(example["instruction"], example["input"])
    if fmt == "prompt_completion":
        return example["prompt"]
    if fmt == "text":
        return ""
    msgs = example["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    msgs = msgs[: last + 1]
    full = _render(tokenizer, msgs)
    start, _ = _assistant_span(tokenizer, msgs, last, full)
    return full[:start]


def _render(tokenizer: Tokenizer, msgs: list[dict], add_generation_prompt: bool = False,
            where: str = "") -> str:
    try:
        return tokenizer.render_chat([{"role": m["role"], "content": m["content"]} for m in msgs],
                                     add_generation_prompt=add_generation_prompt)
    except RecordError:
        raise
    except Exception as e:  # jinja2 TemplateError, raise_exception(...) in templates, ...
        msg = " ".join(str(e).split())[:200]
        raise RecordError(f"chat template failed{where}: {type(e).__name__}: {msg}") from None


# ------------------------------------------------------------------------------------------------
# Trained spans of a conversation, from renderings of its prefixes

# An empty reasoning block that templates of reasoning models (Qwen3, SmolLM3, ...) write before an
# answer that has no reasoning; it is part of the prompt (Qwen3's `enable_thinking=False` generation
# prompt ends with it), not something the model is taught to produce.
_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")
_EXCERPT = 24  # characters shown on each side of the point where two renderings differ


def render_conversation(messages: list[dict], tokenizer: Tokenizer,
                        train_on: str = "all") -> tuple[str, list[tuple[int, int]], bool]:
    """Full text, trained character spans, and whether to append a trained EOS.

    Each trained assistant turn ``i`` is located by rendering prefixes of the conversation (see
    `_assistant_span`), so any template works without ``{% generation %}`` markers. A template
    that rewrites earlier text when a turn is added, or renders an assistant turn as nothing,
    raises RecordError with the reason: a conversation is never returned with a wrong or empty mask."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    if not trained:
        raise RecordError("conversation has no assistant turn to train on")
    if train_on == "last":
        trained = trained[-1:]
    # turns after the last trained assistant turn carry no training signal
    msgs = messages[: trained[-1] + 1]
    full = _render(tokenizer, msgs)

    spans: list[tuple[int, int]] = []
    for i in trained:
        start, end = _assistant_span(tokenizer, msgs, i, full)
        if spans and start < spans[-1][1]:
            raise RecordError(f"chat template cannot be split at the assistant turn at index {i}: its text "
                              f"starts before the end of the previous assistant turn")
        spans.append((start, end))

    append_eos = chatml_appends_eos(tokenizer)
    if append_eos:
        full = full[: spans[-1][1]]  # EOS follows the last assistant turn's `<|im_end|>` directly
    return full, spans, append_eos


def _assistant_span(tokenizer: Tokenizer, msgs: list[dict], i: int, full: str) -> tuple[int, int]:
    """Character span in `full` (the rendering of `msgs`) trained for the assistant turn ``msgs[i]``.

        before = render(msgs[:i], add_generation_prompt=True)   ends where the model starts writing
        upto   = render(msgs[:i+1])                             ends after the turn's end-of-turn marker

    The span is ``upto[len(before):]`` without trailing whitespace (the newline many templates
    write after the end-of-turn marker belongs to the scaffolding) and without a leading empty
    think block. `before` must be a prefix of `upto` and `upto` a prefix of `full`; otherwise the
    template rewrites earlier text when a turn is added (Mistral v0.3 moves the system prompt into
    the last user turn; Qwen3 drops reasoning from all but the last turn) and no span in `full` is
    the assistant's text as the model would write it."""
    try:
        before = _render(tokenizer, msgs[:i], True,
                         where=f" on the conversation before the assistant turn at index {i}")
    except RecordError as e:
        if i == 0:  # transformers refuses to render an empty conversation, as do templates reading messages[0]
            raise RecordError(f"the conversation opens with an assistant turn, and the chat template cannot render "
                              f"the (empty) prompt before it ({e.reason}); start the conversation with a user or "
                              f"system turn") from None
        raise
    if i == len(msgs) - 1:
        upto = full
    else:
        upto = _render(tokenizer, msgs[: i + 1], where=f" on the conversation up to the assistant turn at index {i}")
    if not upto.startswith(before):
        raise _split_error(i, before, upto, "the conversation before it, rendered with the generation prompt, is not "
                                            "a prefix of the conversation rendered with it")
    if not full.startswith(upto):
        raise _split_error(i, upto, full, "the conversation up to it renders differently once later turns follow",
                           hint="; with data.train_on=last only the last assistant turn is trained and split")
    start, end = len(before), len(upto.rstrip())
    think = _EMPTY_THINK.match(upto, start)
    if think is not None and think.end() < end:
        start = think.end()
    text = upto[start:end]
    if not text.strip():
        raise RecordError(f"chat template renders the assistant turn at index {i} as nothing (no text to train on)")
    # the template may trim the content or move its reasoning into a think block, but the answer
    # (after any `</think>`) must be in the span: otherwise the template dropped or replaced it
    answer = "".join(msgs[i]["content"].rsplit("</think>", 1)[-1].split())
    if answer not in "".join(text.split()):
        raise RecordError(f"chat template output for the assistant turn at index {i} does not contain its text "
                          f"(it renders as {_clip(text, 2 * _EXCERPT)})")
    return start, end


def _split_error(i: int, shorter: str, longer: str, what: str, hint: str = "") -> RecordError:
    k = next((j for j, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    lo = max(0, k - _EXCERPT)

    def excerpt(s: str) -> str:
        return ("..." if lo else "") + repr(s[lo:k + _EXCERPT]) + ("..." if len(s) > k + _EXCERPT else "")

    return RecordError(f"chat template cannot be split at the assistant turn at index {i}: {what} (they differ at "
                       f"character {k}: {excerpt(shorter)} vs {excerpt(longer)}); the template rewrites earlier text "
                       f"when a turn is added, so the assistant's tokens cannot be told apart{hint}")


def _clip(s: str, n: int) -> str:
    return repr(s) if len(s) <= n else repr(s[:n]) + "..."
