"""Reading JSON/JSONL, format detection, explicit override, field mapping."""

import json

import pytest

from fastsft.data import (ByteTokenizer, DataError, DatasetSpec, build_dataset, detect_format,
                          encode_record, normalize, read_records)

TOK = ByteTokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build(spec, **kw):
    kw.setdefault("max_seq_len", 4096)
    return build_dataset([spec], TOK, **kw)


@pytest.mark.parametrize("record, fmt", [
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"text": "t"}, "text"),
    ({"text": "t", "instruction": "i", "output": "o"}, "alpaca"),  # more specific format wins
    ({"question": "q", "answer": "a"}, None),
    ({"instruction": "i"}, None),
    ([1, 2], None),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_read_json_list_and_jsonl_agree(tmp_path):
    recs = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2))
    write_jsonl(tmp_path / "a.jsonl", recs)
    # JSONL content in a .json file, and a JSON list in a .jsonl file, are read too
    write_jsonl(tmp_path / "b.json", recs)
    (tmp_path / "b.jsonl").write_text(json.dumps(recs))
    contents = [sorted(ids.tobytes() for ids, _ in build(tmp_path / n).train)
                for n in ("a.json", "a.jsonl", "b.json", "b.jsonl")]
    assert len(contents[0]) == 5 and all(c == contents[0] for c in contents)
    raws = read_records(tmp_path / "a.json")
    assert [r.index for r in raws] == list(range(5)) and raws[0].line is None
    raws = read_records(tmp_path / "a.jsonl")
    assert [r.line for r in raws] == [1, 2, 3, 4, 5]


def test_jsonl_blank_lines_crlf_and_bom(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \n{"text": "b"}\r\n')
    raws = read_records(p)
    assert [(r.line, r.value) for r in raws] == [(1, {"text": "a"}), (4, {"text": "b"})]


def test_detected_format_is_reported_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}] * 3)
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                         {"role": "assistant", "content": "y"}]}] * 3)
    rep = build_dataset([a, m], TOK, max_seq_len=512).report
    assert [(d["format"], d["format_detected"]) for d in rep["datasets"]] == [("alpaca", True), ("messages", True)]


def test_explicit_format_overrides_detection(tmp_path):
    p = write_jsonl(tmp_path / "both.jsonl", [{"text": "plain text", "instruction": "i", "output": "o"}])
    auto = build(p).train
    forced = build(DatasetSpec(p, format="text"))
    assert forced.report["datasets"][0]["format"] == "text"
    assert not forced.report["datasets"][0]["format_detected"]
    ids, labels = forced.train[0]
    assert TOK.decode(ids) == "plain text"
    assert TOK.decode(auto[0][0]).endswith("### Response:\no")


def test_file_format_must_agree(tmp_path):
    p = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "i", "output": "o"}] * 3
                    + [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as e:
        build(p)
    msg = str(e.value)
    assert "mixed.jsonl:4:" in msg and "'instruction' is missing" in msg and "prompt_completion" in msg


def test_gsm8k_like_field_mapping(tmp_path):
    p = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}] * 2)
    with pytest.raises(DataError) as e:
        build(p)
    msg = str(e.value)
    assert "gsm.jsonl" in msg and "'question'" in msg and "'answer'" in msg
    assert "--fields instruction=question,output=answer" in msg and "--format prompt_completion" in msg  # says how to fix it

    pc = build(DatasetSpec(p, fields={"prompt": "question", "completion": "answer"}))
    assert pc.report["datasets"][0]["format"] == "prompt_completion"
    ids, labels = pc.train[0]
    assert TOK.decode([i for i, l in zip(ids, labels) if l != -100], skip_special_tokens=False) == (
        "2+2=4\n#### 4</s>")
    assert TOK.decode(ids).startswith("What is 2+2?")

    al = build(DatasetSpec(p, fields={"instruction": "question", "output": "answer"}))
    assert al.report["datasets"][0]["format"] == "alpaca"
    assert TOK.decode(al.train[0][0]).startswith("Below is an instruction that describes a task. Write")


def test_field_mapping_errors_name_the_source_field(tmp_path):
    p = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "a"}] * 16 + [{"question": "q"}])
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:17: field 'answer' is missing"):
        build(DatasetSpec(p, fields={"prompt": "question", "completion": "answer"}))
    with pytest.raises(DataError, match="unknown canonical field 'question'"):
        DatasetSpec(p, fields={"question": "prompt"})


def test_nested_field_mapping_for_conversations(tmp_path):
    rec = {"chat": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}
    p = write_jsonl(tmp_path / "c.jsonl", [rec])
    b = build(DatasetSpec(p, fields={"messages": "chat", "role": "speaker", "content": "text"}))
    ids, labels = b.train[0]
    assert TOK.decode([i for i, l in zip(ids, labels) if l != -100], skip_special_tokens=False) == "yo<|im_end|>"
    bad = write_jsonl(tmp_path / "d.jsonl", [{"chat": [{"speaker": "user"}]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: chat\[0\]: field 'text' is missing"):
        build(DatasetSpec(bad, fields={"messages": "chat", "role": "speaker", "content": "text"}))


def test_normalize_canonical_forms():
    assert normalize({"instruction": "i", "output": "o", "extra": 1}, "alpaca") == {
        "instruction": "i", "input": "", "output": "o"}
    conv = normalize({"conversations": [{"from": "System", "value": "s"}, {"from": "human", "value": "x"},
                                        {"from": "gpt", "value": "y"}]}, "sharegpt")
    assert conv == {"messages": [{"role": "system", "content": "s", "train": False},
                                 {"role": "user", "content": "x", "train": False},
                                 {"role": "assistant", "content": "y", "train": True}]}


def test_in_memory_records_spec():
    recs = [{"prompt": f"{k}+{k}=", "completion": str(2 * k)} for k in range(10)]
    b = build_dataset([DatasetSpec(records=recs, name="builtin")], TOK, max_seq_len=64)
    assert len(b.train) == 10 and b.report["datasets"][0]["name"] == "builtin"
    assert b.train.names == ["builtin"]
    with pytest.raises(DataError, match=r"builtin\[3\]: field 'completion' is empty"):
        build_dataset([DatasetSpec(records=recs[:3] + [{"prompt": "x", "completion": ""}], name="builtin")],
                      TOK, max_seq_len=64)


def test_encode_record_auto_reason_only():
    with pytest.raises(DataError) as e:
        encode_record({"question": "q"}, "auto", TOK)
    assert "cannot detect" in str(e.value) and ".jsonl" not in str(e.value)
