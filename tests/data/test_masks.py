"""Labels checked token by token for every format, with the ByteTokenizer (expected arrays written
out by hand) and with the real Llama-2 tokenizer (ChatML fallback and a custom HF chat template)."""

from pathlib import Path

import pytest

from fastsft.data.errors import RecordError

from fastsft.data import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, ByteTokenizer, encode_record,
                          load_tokenizer, normalize, prompt_text)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LLAMA2 = SHARED / "tokenizers" / "llama2"
M = -100
PAD, BOS, EOS, IM_START, IM_END = 256, 257, 258, 259, 260


def b(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def masked(s: str) -> list[int]:
    return [M] * len(b(s))


def trained_ids(ids, labels):
    assert all(l == M or l == i for i, l in zip(ids, labels)), "labels must be ids or -100 (unshifted)"
    return [i for i, l in zip(ids, labels) if l != M]


@pytest.fixture(scope="module")
def byte():
    return ByteTokenizer()


@pytest.fixture
def llama():
    if not (LLAMA2 / "tokenizer.json").exists():
        pytest.skip(f"{LLAMA2} not present")
    return load_tokenizer(LLAMA2)  # fresh per test: some tests set a chat template on it


# ------------------------------------------------------------------------------------------------
# ByteTokenizer: exact arrays


def test_alpaca_templates_are_the_stanford_text():
    assert ALPACA_PROMPT == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    assert ALPACA_PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def test_alpaca_with_input(byte):
    rec = {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}
    ids, labels = encode_record(rec, "alpaca", byte)
    prompt = ALPACA_PROMPT.format(instruction="Add the numbers.", input="2, 3")
    assert ids == [BOS] + b(prompt) + b("5") + [EOS]
    assert labels == [M] + masked(prompt) + b("5") + [EOS]
    assert byte.decode(trained_ids(ids, labels), skip_special_tokens=False) == "5</s>"


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}, {"input": "  "}])
def test_alpaca_without_input(byte, extra):
    rec = {"instruction": "Say hi.", "output": "Hi! ünïcode ✓", **extra}
    ids, labels = encode_record(rec, "auto", byte)
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert ids == [BOS] + b(prompt) + b("Hi! ünïcode ✓") + [EOS]
    assert labels == [M] + masked(prompt) + b("Hi! ünïcode ✓") + [EOS]
    assert byte.decode(trained_ids(ids, labels), skip_special_tokens=False) == "Hi! ünïcode ✓</s>"


def test_prompt_completion(byte):
    ids, labels = encode_record({"prompt": "Q: 1+1?\nA:", "completion": " 2"}, "auto", byte)
    assert ids == [BOS] + b("Q: 1+1?\nA:") + b(" 2") + [EOS]
    assert labels == [M] + masked("Q: 1+1?\nA:") + b(" 2") + [EOS]


def test_text_trains_everything_but_bos(byte):
    ids, labels = encode_record({"text": "Once upon a time."}, "auto", byte)
    assert ids == [BOS] + b("Once upon a time.") + [EOS]
    assert labels == [M] + b("Once upon a time.") + [EOS]
    assert byte.decode(trained_ids(ids, labels), skip_special_tokens=False) == "Once upon a time.</s>"


def test_add_bos_options(byte):
    rec = {"prompt": "p", "completion": "c"}
    assert encode_record(rec, "auto", byte, add_bos=False) == ([ord("p"), ord("c"), EOS], [M, ord("c"), EOS])
    assert encode_record(rec, "auto", byte, add_bos=True)[0] == [BOS, ord("p"), ord("c"), EOS]
    # position 0 is never trained, even for text without BOS (nothing predicts it)
    assert encode_record({"text": "ab"}, "text", byte, add_bos=False) == ([97, 98, EOS], [M, 98, EOS])
    # a prompt that already starts with BOS gets no second one
    assert encode_record({"prompt": "<s>p", "completion": "c"}, "auto", byte)[0] == [BOS, ord("p"), ord("c"), EOS]


def chatml(role, content):
    return [IM_START] + b(f"{role}\n{content}") + [IM_END] + b("\n")


def test_sharegpt_with_system(byte):
    rec = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello → you"}]}
    ids, labels = encode_record(rec, "sharegpt", byte)
    head = chatml("system", "Be brief.") + chatml("user", "Hi") + [IM_START] + b("assistant\n")
    assert ids == [BOS] + head + b("Hello → you") + [IM_END] + b("\n")
    assert labels == [M] + [M] * len(head) + b("Hello → you") + [IM_END] + [M]
    assert byte.decode(trained_ids(ids, labels), skip_special_tokens=False) == "Hello → you<|im_end|>"


def test_sharegpt_role_aliases(byte):
    a = encode_record({"conversations": [{"from": "user", "value": "x"}, {"from": "assistant", "value": "y"}]},
                      "auto", byte)
    b_ = encode_record({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
                       "auto", byte)
    c = encode_record({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                      "auto", byte)
    assert a == b_ == c


CONV = {"messages": [{"role": "system", "content": "S"},
                     {"role": "user", "content": "q1"},
                     {"role": "assistant", "content": "a1"},
                     {"role": "user", "content": "q2"},
                     {"role": "assistant", "content": "a2"}]}


def test_messages_multi_turn_all(byte):
    ids, labels = encode_record(CONV, "messages", byte)
    expected_ids = ([BOS] + chatml("system", "S") + chatml("user", "q1") + chatml("assistant", "a1")
                    + chatml("user", "q2") + chatml("assistant", "a2"))
    assert ids == expected_ids
    gen = [M] * len([IM_START] + b("assistant\n"))
    expected = ([M] + [M] * len(chatml("system", "S") + chatml("user", "q1"))
                + gen + b("a1") + [IM_END] + [M]
                + [M] * len(chatml("user", "q2"))
                + gen + b("a2") + [IM_END] + [M])
    assert labels == expected
    assert byte.decode(trained_ids(ids, labels), skip_special_tokens=False) == "a1<|im_end|>a2<|im_end|>"


def test_messages_multi_turn_last_only(byte):
    ids, labels = encode_record(CONV, "messages", byte, train_on="last")
    assert ids == encode_record(CONV, "messages", byte)[0]
    assert byte.decode(trained_ids(ids, labels), skip_special_tokens=False) == "a2<|im_end|>"
    n_tail = len(b("a2")) + 2  # a2 <|im_end|> \n
    assert labels[-n_tail:] == b("a2") + [IM_END, M]
    assert all(l == M for l in labels[:-n_tail])


def test_trailing_user_turn_and_weights(byte):
    rec = {"messages": CONV["messages"] + [{"role": "user", "content": "q3"}]}
    assert encode_record(rec, "auto", byte) == encode_record(CONV, "auto", byte)  # trailing turn dropped
    w = {"messages": [dict(m) for m in CONV["messages"]]}
    w["messages"][4]["weight"] = 0  # OpenAI fine-tuning files: weight 0 -> not trained
    ids, labels = encode_record(w, "auto", byte)
    assert byte.decode(trained_ids(ids, labels), skip_special_tokens=False) == "a1<|im_end|>"


def test_prompt_text_matches_masked_prefix(byte):
    ids, labels = encode_record(CONV, "messages", byte, train_on="last")
    p = prompt_text(normalize(CONV, "messages"), "messages", byte)
    n = len(byte.encode(p)[0]) + 1  # + BOS
    assert ids[1:n] == byte.encode(p)[0] and labels[n] != M and all(l == M for l in labels[:n])


# ------------------------------------------------------------------------------------------------
# Llama-2: prompt/response formats


def test_llama_alpaca(llama):
    rec = {"instruction": "Add 2 and 2.", "input": "", "output": "The answer is 4."}
    ids, labels = encode_record(rec, "alpaca", llama)
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Add 2 and 2.")
    p_ids, _ = llama.encode(prompt)
    r_ids, _ = llama.encode("The answer is 4.")
    assert ids == [1] + p_ids + r_ids + [2]
    assert labels == [M] * (1 + len(p_ids)) + r_ids + [2]
    assert ids.count(1) == 1  # exactly one BOS
    tokens = llama.hf.convert_ids_to_tokens(ids)
    assert [(t, l != M) for t, l in zip(tokens, labels)][-9:] == [
        (":", False), ("<0x0A>", False), ("The", True), ("▁answer", True), ("▁is", True), ("▁", True),
        ("4", True), (".", True), ("</s>", True)]
    assert [t for t, l in zip(tokens, labels) if l != M] == ["The", "▁answer", "▁is", "▁", "4", ".", "</s>"]
    assert llama.decode(trained_ids(ids, labels), skip_special_tokens=False) == "The answer is 4.</s>"


def test_llama_text_and_prompt_completion(llama):
    ids, labels = encode_record({"text": "Hello world"}, "auto", llama)
    assert llama.hf.convert_ids_to_tokens(ids) == ["<s>", "Hello", "▁world", "</s>"]
    assert labels == [M, ids[1], ids[2], 2]
    ids, labels = encode_record({"prompt": "Q: hi\nA:", "completion": " yes"}, "auto", llama)
    assert [t for t, l in zip(llama.hf.convert_ids_to_tokens(ids), labels) if l != M] == ["▁yes", "</s>"]


# ------------------------------------------------------------------------------------------------
# Llama-2: conversations


LLAMA_CONV = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "Hello there!"},
                           {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}]}
IM_END_TEXT = ["<", "|", "im", "_", "end", "|", ">"]


def test_llama_chatml_fallback(llama):
    """No chat template and no <|im_end|> token: ChatML as text, <|im_end|> text trained, EOS
    appended after the last assistant turn."""
    ids, labels = encode_record(LLAMA_CONV, "messages", llama)
    tokens = llama.hf.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>" and labels[0] == M and tokens.count("<s>") == 1
    assert ids[-1] == 2 and labels[-1] == 2
    trained = [t for t, l in zip(tokens, labels) if l != M]
    assert trained == ["Hello", "▁there", "!", *IM_END_TEXT, "4", *IM_END_TEXT, "</s>"]
    # token by token around the first assistant turn: scaffolding masked, newline after <|im_end|> masked
    k = tokens.index("Hello")
    assert [(t, l != M) for t, l in zip(tokens[k - 3:k + 13], labels[k - 3:k + 13])] == [
        ("ass", False), ("istant", False), ("<0x0A>", False), ("Hello", True), ("▁there", True),
        ("!", True)] + [(t, True) for t in IM_END_TEXT] + [("<0x0A>", False), ("<", False), ("|", False)]
    _, last = encode_record(LLAMA_CONV, "messages", llama, train_on="last")
    assert [t for t, l in zip(tokens, last) if l != M] == ["4", *IM_END_TEXT, "</s>"]


LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}")


def test_llama_custom_chat_template(llama):
    """HF-template path: the template's own </s> ends each assistant turn and is trained; no EOS
    is appended; everything else (BOS from the template, [INST] blocks, system) is masked."""
    llama.hf.chat_template = LLAMA2_CHAT_TEMPLATE
    ids, labels = encode_record(LLAMA_CONV, "messages", llama)
    tokens = llama.hf.convert_ids_to_tokens(ids)
    assert llama.decode(ids, skip_special_tokens=False) == (
        "<s><<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] hi [/INST] Hello there! </s>[INST] 2+2? [/INST] 4 </s>")
    assert tokens.count("<s>") == 1  # the template's BOS; add_bos="auto" adds none
    assert [(t, l != M) for t, l in zip(tokens, labels)][17:] == [
        ("[", False), ("INST", False), ("]", False), ("▁hi", False), ("▁[", False), ("/", False),
        ("INST", False), ("]", False),
        ("▁Hello", True), ("▁there", True), ("!", True), ("▁", True), ("</s>", True),
        ("[", False), ("INST", False), ("]", False), ("▁", False), ("2", False), ("+", False),
        ("2", False), ("?", False), ("▁[", False), ("/", False), ("INST", False), ("]", False),
        ("▁", True), ("4", True), ("▁", True), ("</s>", True)]
    assert all(l == M for l in labels[:17])
    _, last = encode_record(LLAMA_CONV, "messages", llama, train_on="last")
    assert [t for t, l in zip(tokens, last) if l != M] == ["▁", "4", "▁", "</s>"]


CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_llama_chatml_as_hf_template_appends_no_eos(llama):
    """The same ChatML text through the HF-template path: the template is trusted, so no EOS."""
    llama.hf.chat_template = CHATML_JINJA
    ids, labels = encode_record(LLAMA_CONV, "messages", llama)
    tokens = llama.hf.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>" and tokens[-1] == "<0x0A>" and labels[-1] == M
    assert [t for t, l in zip(tokens, labels) if l != M] == [
        "Hello", "▁there", "!", *IM_END_TEXT, "4", *IM_END_TEXT]


def test_llama_template_without_prefix_stability_is_an_error_not_a_guess(llama):
    # a template that numbers turns from the end renders prefixes differently from the whole: the trained
    # spans cannot be found by rendering prefixes, and guessing them by searching for the text is refused
    llama.hf.chat_template = (
        "{% for m in messages %}[{{ messages|length - loop.index }}] {{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}")
    with pytest.raises(RecordError, match="cannot be split"):
        encode_record(LLAMA_CONV, "messages", llama)
