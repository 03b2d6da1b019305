"""Rendering canonical examples (see formats.py) to text with trained character spans.

A `Rendered` is a list of pieces, each tokenized on its own, with the character spans of each piece
whose tokens are trained, plus whether a trained EOS id follows:

    alpaca / prompt_completion   [(prompt, []), (response, [whole])] + EOS
    text                         [(text, [whole])] + EOS
    sharegpt / messages          [(whole conversation, [assistant spans])] (+ EOS, ChatML fallback only)

Prompt and response are tokenized separately so the prompt tokens are exactly what generation
sees. Conversations are rendered once with the tokenizer's chat template (ChatML when it has none)
and each trained assistant span runs from the end of the prefix ``messages[:i]`` rendered with the
generation prompt to the end of ``messages[:i+1]`` (the assistant text plus the template's
end-of-turn marker, minus trailing whitespace). Templates for which prefixes are not prefixes of the
whole conversation fall back to locating the assistant content in the text.
"""

from __future__ import annotations

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
    trained token of the response; for conversations, everything before the last assistant turn
    plus the generation prompt)."""
    if fmt == "alpaca":
        return alpaca_prompt(example["instruction"], example["input"])
    if fmt == "prompt_completion":
        return example["prompt"]
    if fmt == "text":
        return ""
    msgs = example["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return _render(tokenizer, msgs[:last], True)


def _render(tokenizer: Tokenizer, msgs: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.render_chat([{"role": m["role"], "content": m["content"]} for m in msgs],
                                     add_generation_prompt=add_generation_prompt)
    except RecordError:
        raise
    except Exception as e:  # jinja2 TemplateError, raise_exception(...) in templates, ...
        msg = " ".join(str(e).split())[:200]
        raise RecordError(f"chat template failed: {type(e).__name__}: {msg}") from None


def _try_render(tokenizer: Tokenizer, msgs: list[dict], add_generation_prompt: bool) -> str | None:
    try:
        return _render(tokenizer, msgs, add_generation_prompt)
    except RecordError:
        return None


def render_conversation(messages: list[dict], tokenizer: Tokenizer,
                        train_on: str = "all") -> tuple[str, list[tuple[int, int]], bool]:
    """Full text, trained character spans, and whether to append a trained EOS."""
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
    cursor = 0
    for i in trained:
        content = msgs[i]["content"]
        core = content.strip() or content
        before = _try_render(tokenizer, msgs[:i], True)
        if before is not None and full.startswith(before) and len(before) >= cursor:
            start = len(before)
        else:
            start = full.find(core, cursor)
            if start < 0:
                raise RecordError(f"chat template output does not contain the text of turn {i}")
        upto = _try_render(tokenizer, msgs[: i + 1], False)
        if upto is not None and full.startswith(upto) and len(upto.rstrip()) > start:
            end = len(upto.rstrip())  # trailing newline after the end-of-turn marker is not trained
        else:
            pos = full.find(core, start)
            if pos < 0:
                raise RecordError(f"chat template output does not contain the text of turn {i}")
            end = pos + len(core)
        spans.append((start, end))
        cursor = end

    append_eos = chatml_appends_eos(tokenizer)
    if append_eos:
        full = full[: spans[-1][1]]  # EOS follows the last assistant turn's `<|im_end|>` directly
    return full, spans, append_eos
