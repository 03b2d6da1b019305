"""Conversations rendered with the model's own chat template, masks found by rendering prefixes.

The templates are the real ones of Llama 3.1 Instruct, Qwen2.5 Instruct, Mistral Instruct v0.3, Gemma 3 (system
prompt folded into the first user turn), SmolLM2 (ChatML with a default system prompt) and Qwen3 (empty think
blocks), as fixture files under fixtures/chat_templates/. They are set on fastsft's byte-level tokenizer written as
transformers files (`write_byte_tokenizer`) with each family's special tokens added, so every end-of-turn marker is
one token and the masks can be checked token by token.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest

from fastsft.data import DatasetSpec, RecordError, encode_record, load_dataset, normalize, prompt_text
from fastsft.data.errors import DataError
from fastsft.data.tokenizer import HFTokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
LLAMA2 = Path(__file__).resolve().parents[2].parent / "shared" / "tokenizers" / "llama2"
M = -100


@dataclass(frozen=True)
class Family:
    template: str                 # fixture file name
    bos: str | None
    eos: str
    specials: tuple[str, ...]
    turn: str                     # the trained text of one assistant turn, "{}" for its content
    folds_system: bool = False    # the system prompt is written into the first user turn


FAMILIES = {
    "llama3": Family("llama3.1-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
                     "{}<|eot_id|>"),
    "qwen2.5": Family("qwen2.5-instruct.jinja", None, "<|im_end|>", ("<|im_start|>", "<|im_end|>"), "{}<|im_end|>"),
    "mistral": Family("mistral-v0.3-instruct.jinja", "<s>", "</s>", ("[INST]", "[/INST]"), " {}</s>"),
    "gemma": Family("gemma3-it.jinja", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), "{}<end_of_turn>",
                    folds_system=True),
    "smollm2": Family("smollm2-instruct.jinja", "<|im_start|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>"),
                      "{}<|im_end|>"),
    "qwen3": Family("qwen3.jinja", None, "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
                    "{}<|im_end|>"),
}

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "It is 4 \u2014 four."},
         {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "It is 6."}]
ANSWERS = [TURNS[1]["content"], TURNS[3]["content"]]


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    from fastsft.export import write_byte_tokenizer

    d = tmp_path_factory.mktemp("byte_tokenizer")
    write_byte_tokenizer(str(d))
    return d


def make_tokenizer(byte_dir: Path, family: Family, template: str | None = None) -> HFTokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(byte_dir))
    hf.add_special_tokens({"additional_special_tokens": list(family.specials)})
    hf.add_special_tokens({"eos_token": family.eos, **({"bos_token": family.bos} if family.bos else {})})
    if family.bos is None:
        hf.bos_token = None
    hf.chat_template = template if template is not None else (FIXTURES / family.template).read_text()
    return HFTokenizer(hf, name=family.template)


@pytest.fixture
def tok(byte_dir, request):
    return make_tokenizer(byte_dir, FAMILIES[request.param])


def trained_runs(ids, labels) -> list[list[int]]:
    """The trained ids, one list per contiguous trained stretch."""
    assert all(l == M or l == i for i, l in zip(ids, labels)), "labels must be ids or -100 (unshifted)"
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != M:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def text(tok: HFTokenizer, ids) -> str:
    return tok.hf.decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------
# The five template families: every assistant turn is its content plus its end-of-turn token


CASES = [(f, s) for f in ("llama3", "qwen2.5", "mistral", "gemma", "smollm2") for s in (False, True)
         if not (f == "mistral" and s)]  # Mistral v0.3 with a system prompt: see test_mistral_system_prompt_*


@pytest.mark.parametrize("tok,system", CASES, indirect=["tok"],
                         ids=[f"{f}-{'sys' if s else 'nosys'}" for f, s in CASES])
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_assistant_turns_are_trained_with_their_end_of_turn_token(tok, system, train_on):
    family = next(f for f in FAMILIES.values() if f.template == tok.name)
    messages = ([SYSTEM] if system else []) + TURNS
    ids, labels = encode_record({"messages": messages}, "messages", tok, train_on=train_on)

    # the tokens are exactly the template's own rendering (the templates write their BOS; none is added)
    decoded = text(tok, ids)
    assert decoded == tok.hf.apply_chat_template(messages, tokenize=False)
    assert decoded.startswith(family.bos or "<|im_start|>system\n")
    if system:
        assert SYSTEM["content"] in decoded

    answers = ANSWERS if train_on == "all" else ANSWERS[-1:]
    runs = trained_runs(ids, labels)
    assert [text(tok, r) for r in runs] == [family.turn.format(a) for a in answers]
    eot = tok.token_to_id(family.turn.format("").strip())
    for run in runs:
        assert run[-1] == eot  # the end-of-turn marker is one trained token
    # nothing of the prompts: the user turns, the system prompt and the headers are all masked
    masked = text(tok, [i for i, l in zip(ids, labels) if l == M])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in masked
    # the token right after each trained stretch (the next turn's start, or the template's newline) is masked
    ends = [k for k in range(len(ids)) if labels[k] != M and (k + 1 == len(ids) or labels[k + 1] == M)]
    assert len(ends) == len(runs) and all(k + 1 == len(ids) or labels[k + 1] == M for k in ends)


@pytest.mark.parametrize("tok", ["gemma"], indirect=True)
def test_gemma_folds_the_system_prompt_into_the_first_user_turn(tok):
    ids, labels = encode_record({"messages": [SYSTEM] + TURNS}, "messages", tok)
    assert text(tok, ids).startswith("<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n")
    assert [text(tok, r) for r in trained_runs(ids, labels)] == [f"{a}<end_of_turn>" for a in ANSWERS]


@pytest.mark.parametrize("tok", ["llama3"], indirect=True)
def test_llama3_token_by_token(tok):
    ids, labels = encode_record({"messages": [SYSTEM] + TURNS[:2]}, "messages", tok)
    toks = [(text(tok, [i]), l != M) for i, l in zip(ids, labels)]
    k = next(j for j, l in enumerate(labels) if l != M)
    assert toks[k] == ("I", True)
    assert toks[k - 3:k] == [("<|end_header_id|>", False), ("\n", False), ("\n", False)]
    assert toks[-1] == ("<|eot_id|>", True) and toks[0] == ("<|begin_of_text|>", False)
    assert all(trained for _, trained in toks[k:])


@pytest.mark.parametrize("tok", ["llama3"], indirect=True)
def test_templates_that_trim_train_the_trimmed_text(tok):
    messages = [TURNS[0], {"role": "assistant", "content": "  It is 4.\n\n"}]
    ids, labels = encode_record({"messages": messages}, "messages", tok)
    assert [text(tok, r) for r in trained_runs(ids, labels)] == ["It is 4.<|eot_id|>"]


@pytest.mark.parametrize("tok", ["llama3"], indirect=True)
def test_sharegpt_renders_with_the_template_too(tok):
    rec = {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "What is 2+2?"},
                             {"from": "gpt", "value": "It is 4."}]}
    ids, labels = encode_record(rec, "auto", tok)
    assert "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>" in text(tok, ids)
    assert [text(tok, r) for r in trained_runs(ids, labels)] == ["It is 4.<|eot_id|>"]


@pytest.mark.parametrize("tok", ["llama3", "qwen2.5", "gemma", "smollm2"], indirect=True)
def test_prompt_text_is_the_masked_prefix(tok):
    example = normalize({"messages": [SYSTEM] + TURNS}, "messages")
    p = prompt_text(example, "messages", tok)
    ids, labels = encode_record({"messages": [SYSTEM] + TURNS}, "messages", tok, train_on="last")
    first = next(k for k, l in enumerate(labels) if l != M)
    assert text(tok, ids[:first]) == p


@pytest.mark.parametrize("tok", ["llama3", "qwen2.5", "gemma", "smollm2"], indirect=True)
def test_weight_0_turns_are_not_trained(tok):
    messages = [dict(m) for m in TURNS]
    messages[1]["weight"] = 0
    ids, labels = encode_record({"messages": messages}, "messages", tok)
    assert len(trained_runs(ids, labels)) == 1 and ANSWERS[0] in text(tok, ids)


# ------------------------------------------------------------------------------------------------
# Reasoning templates: the empty think block is prompt, not answer


@pytest.mark.parametrize("tok", ["qwen3"], indirect=True)
def test_qwen3_empty_think_block_is_never_trained(tok):
    messages = TURNS[:2]
    ids, labels = encode_record({"messages": messages}, "messages", tok)
    full = text(tok, ids)
    assert full == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                    f"{ANSWERS[0]}<|im_end|>\n")
    assert [text(tok, r) for r in trained_runs(ids, labels)] == [f"{ANSWERS[0]}<|im_end|>"]
    think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    assert {think, end_think} <= set(ids)
    assert all(l == M for i, l in zip(ids, labels) if i in (think, end_think))
    # generation gets the think block as prompt (what enable_thinking=False writes)
    p = prompt_text(normalize({"messages": messages}, "messages"), "messages", tok)
    assert p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("tok", ["qwen3"], indirect=True)
def test_qwen3_reasoning_that_is_there_is_trained(tok):
    messages = [TURNS[0], {"role": "assistant", "content": "<think>\n2 and 2 make 4.\n</think>\n\nIt is 4."}]
    ids, labels = encode_record({"messages": messages}, "messages", tok)
    assert [text(tok, r) for r in trained_runs(ids, labels)] == [
        "<think>\n2 and 2 make 4.\n</think>\n\nIt is 4.<|im_end|>"]


@pytest.mark.parametrize("tok", ["qwen3"], indirect=True)
def test_qwen3_multi_turn_trains_the_last_turn_and_refuses_all(tok):
    ids, labels = encode_record({"messages": [SYSTEM] + TURNS}, "messages", tok, train_on="last")
    assert [text(tok, r) for r in trained_runs(ids, labels)] == [f"{ANSWERS[1]}<|im_end|>"]
    # Qwen3 writes the think block only after the last user turn: the first answer renders differently once the
    # conversation goes on, so its tokens in the whole conversation are not what the model writes after turn 1
    with pytest.raises(RecordError, match=r"cannot be split at the assistant turn at index 2: the conversation up to "
                                          r"it renders differently.*train_on=last"):
        encode_record({"messages": [SYSTEM] + TURNS}, "messages", tok, train_on="all")


# ------------------------------------------------------------------------------------------------
# Templates that cannot be split, and assistant turns rendered as nothing: errors, never empty masks


@pytest.mark.parametrize("tok", ["mistral"], indirect=True)
def test_mistral_system_prompt_cannot_be_split(tok):
    """Mistral v0.3 writes the system prompt into the last user turn only when the conversation ends with it,
    and drops it otherwise: the prompt before an answer is not a prefix of the conversation with the answer."""
    with pytest.raises(RecordError, match=r"cannot be split at the assistant turn at index 4: the conversation before "
                                          r"it, rendered with the generation prompt, is not a prefix.*You are terse"):
        encode_record({"messages": [SYSTEM] + TURNS}, "messages", tok, train_on="last")


@pytest.mark.parametrize("tok", ["mistral"], indirect=True)
def test_unsplittable_record_is_named_in_the_file(tok, tmp_path):
    import json

    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": TURNS}) + "\n" + json.dumps({"messages": [SYSTEM] + TURNS}) + "\n")
    with pytest.raises(DataError, match=r"chats\.jsonl:2: chat template cannot be split"):
        load_dataset(DatasetSpec(path=path), tok, max_seq_len=512)
    store, report = load_dataset(DatasetSpec(path=path), tok, max_seq_len=512, skip_bad_records=True)
    assert len(store) == 1


def test_template_rewriting_earlier_turns_is_an_error(byte_dir):
    # numbers turns from the end: every prefix renders differently from the whole conversation
    tok = make_tokenizer(byte_dir, FAMILIES["qwen2.5"], (
        "{% for m in messages %}[{{ messages|length - loop.index }}] {{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}"))
    for train_on in ("all", "last"):
        with pytest.raises(RecordError, match="cannot be split"):
            encode_record({"messages": [SYSTEM] + TURNS}, "messages", tok, train_on=train_on)


def test_template_that_renders_no_assistant_turn_is_an_error(byte_dir):
    tok = make_tokenizer(byte_dir, FAMILIES["qwen2.5"],
                         "{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n{% endif %}{% endfor %}")
    with pytest.raises(RecordError, match=r"renders the assistant turn at index 1 as nothing"):
        encode_record({"messages": TURNS}, "messages", tok)


def test_template_that_drops_the_assistant_text_is_an_error(byte_dir):
    # reads a key the messages do not have: each assistant turn renders as its end-of-turn marker alone
    tok = make_tokenizer(byte_dir, FAMILIES["qwen2.5"], (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.text }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    with pytest.raises(RecordError, match=r"assistant turn at index 1 does not contain its text"):
        encode_record({"messages": TURNS}, "messages", tok)


def test_template_exceptions_are_record_errors(byte_dir):
    # Gemma 3 requires user/assistant alternation
    tok = make_tokenizer(byte_dir, FAMILIES["gemma"])
    with pytest.raises(RecordError, match=r"chat template failed: TemplateError: Conversation roles must alternate"):
        encode_record({"messages": [TURNS[1], TURNS[0], TURNS[1]]}, "messages", tok)
    # Qwen2.5 renders a conversation opening with the assistant, but not the empty prompt before that turn
    tok = make_tokenizer(byte_dir, FAMILIES["qwen2.5"])
    with pytest.raises(RecordError, match=r"the conversation opens with an assistant turn, and the chat template "
                                          r"cannot render the \(empty\) prompt before it \(chat template failed"):
        encode_record({"messages": [TURNS[1], TURNS[0], TURNS[1]]}, "messages", tok)


# ------------------------------------------------------------------------------------------------
# The real Llama-2 (SentencePiece) tokenizer with the Mistral template


def test_mistral_template_on_a_sentencepiece_tokenizer():
    if not (LLAMA2 / "tokenizer.json").exists():
        pytest.skip(f"{LLAMA2} not present")
    tok = load_tokenizer(LLAMA2)
    tok.hf.chat_template = (FIXTURES / "mistral-v0.3-instruct.jinja").read_text()
    ids, labels = encode_record({"messages": TURNS}, "messages", tok)
    tokens = tok.hf.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>" and tokens.count("<s>") == 1
    runs = [tok.hf.convert_ids_to_tokens(r) for r in trained_runs(ids, labels)]
    assert [r[-1] for r in runs] == ["</s>", "</s>"]
    assert [tok.decode(r).strip() for r in trained_runs(ids, labels)] == ANSWERS
    assert "".join(runs[1]).replace("▁", " ") == " It is 6.</s>"
    k = labels.index(next(l for l in labels if l != M))
    assert "".join(tokens[k - 3:k]).endswith("]") and labels[k - 1] == M  # ...[/INST] masked
