"""Tokenizer interface: ByteTokenizer (always) and the Llama-2 HF tokenizer (when ../shared has it)."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsft.data import BYTE_MARKER_FILE, ByteTokenizer, HFTokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LLAMA2 = SHARED / "tokenizers" / "llama2"


@pytest.fixture(scope="module")
def llama():
    if not (LLAMA2 / "tokenizer.json").exists():
        pytest.skip(f"{LLAMA2} not present")
    return load_tokenizer(LLAMA2)


# ------------------------------------------------------------------------------------------------
# ByteTokenizer


def test_byte_ids_and_properties():
    t = ByteTokenizer()
    assert t.vocab_size == 272
    assert (t.pad_id, t.bos_id, t.eos_id) == (256, 257, 258)
    assert t.token_to_id("<|im_start|>") == 259 and t.token_to_id("<|im_end|>") == 260
    assert t.token_to_id("<nope>") is None
    assert not t.has_chat_template
    assert t.stop_ids == [258, 260]  # ChatML turns end with <|im_end|>, a single token here
    ids, offsets = t.encode("Hi!")
    assert ids == [72, 105, 33]
    assert offsets == [(0, 1), (1, 2), (2, 3)]


def test_byte_specials_are_atomic_and_skippable():
    t = ByteTokenizer()
    text = "<s>a</s><|im_start|>b<|im_end|><pad><|im_end"
    ids, offsets = t.encode(text)
    assert ids[:8] == [257, 97, 258, 259, 98, 260, 256, ord("<")]
    assert offsets[:3] == [(0, 3), (3, 4), (4, 8)]
    assert t.decode(ids, skip_special_tokens=False) == text
    assert t.decode(ids) == "ab<|im_end"
    assert t.decode([261, 271, 97]) == "a"  # unused ids decode to nothing


def test_byte_multibyte_offsets_are_character_offsets():
    t = ByteTokenizer()
    text = "é日🙂x"
    ids, offsets = t.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert offsets == [(0, 1)] * 2 + [(1, 2)] * 3 + [(2, 3)] * 4 + [(3, 4)]
    assert t.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_roundtrip_and_offsets(text):
    t = ByteTokenizer()
    ids, offsets = t.encode(text)
    assert t.decode(ids, skip_special_tokens=False) == text
    assert len(ids) == len(offsets)
    # offsets are non-decreasing, within the text, and each token's bytes come from its characters
    assert all(0 <= s < e <= len(text) for s, e in offsets)
    assert [s for s, _ in offsets] == sorted(s for s, _ in offsets)
    covered = "".join(text[s:e] for k, (s, e) in enumerate(offsets) if k == 0 or offsets[k - 1] != (s, e))
    assert covered == text


def test_byte_lone_surrogate_is_a_value_error():
    with pytest.raises(ValueError, match="surrogate"):
        ByteTokenizer().encode("a\ud800b")


def test_byte_save_load(tmp_path):
    t = ByteTokenizer()
    t.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / BYTE_MARKER_FILE).read_text())["type"] == "byte"
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path / "tok")), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert load_tokenizer(t) is t


def test_byte_render_chat_is_chatml():
    t = ByteTokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert t.render_chat(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert t.render_chat(msgs[:1], add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_load_tokenizer_errors_are_one_line_and_name_the_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(ValueError) as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        load_tokenizer(empty)
    assert str(empty) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / BYTE_MARKER_FILE).write_text('{"type": "unicorn"}')
    with pytest.raises(ValueError, match="unicorn"):
        load_tokenizer(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------
# Llama-2 (HF fast tokenizer)


def test_llama_properties(llama):
    assert isinstance(llama, HFTokenizer)
    assert llama.vocab_size == 32000
    assert (llama.bos_id, llama.eos_id) == (1, 2)
    assert llama.hf.pad_token_id is None and llama.pad_id == 2  # no pad: falls back to EOS
    assert not llama.has_chat_template
    assert llama.token_to_id("</s>") == 2 and llama.token_to_id("<|im_end|>") is None
    assert llama.stop_ids == [2]


def test_llama_encode_adds_no_specials_and_gives_offsets(llama):
    text = "Hello world\n7"
    ids, offsets = llama.encode(text)
    assert 1 not in ids and 2 not in ids  # this tokenizers version adds no BOS by itself
    assert [text[s:e] for s, e in offsets] == ["Hello", " world", "\n", "7"]
    assert llama.decode(ids) == text
    assert llama.encode_batch([text, "a b"]) == [llama.encode(text), llama.encode("a b")]
    # special-token text inside the input becomes the special id
    ids, _ = llama.encode("a</s>")
    assert ids[-1] == 2


def test_llama_render_chat_chatml_then_template(llama):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert llama.render_chat(msgs).startswith("<|im_start|>user\nhi<|im_end|>\n")
    hf = llama.hf
    old = hf.chat_template
    try:
        hf.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                            "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
        assert llama.has_chat_template
        assert llama.render_chat(msgs) == "[INST] hi [/INST] yo </s>"
    finally:
        hf.chat_template = old


def test_llama_save_load(llama, tmp_path):
    llama.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, HFTokenizer)
    assert again.encode("Hello world") == llama.encode("Hello world")
