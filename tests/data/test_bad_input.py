"""Bad input: every problem is a DataError naming the file, the line (JSONL) or record index (JSON
list) and the reason; skip_bad_records=True skips and counts bad records instead."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsft.data import ByteTokenizer, DataError, DatasetSpec, build_dataset

TOK = ByteTokenizer()
GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi"}
GOOD_CONV = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}


def build(paths, **kw):
    return build_dataset(paths, TOK, max_seq_len=256, **kw)


# (bad line as text, reason substring); the bad record is line 3 of an alpaca file
ALPACA_CASES = [
    ('{"instruction": "x", "output": ', "invalid JSON"),
    ('{"instruction": "x" "output": "y"}', "invalid JSON"),
    ('[1, 2, 3]', "record is not a JSON object (got a list)"),
    ('"just a string"', "record is not a JSON object (got a string)"),
    ('null', "record is not a JSON object (got null)"),
    ('{"instruction": "x"}', "field 'output' is missing"),
    ('{"output": "y", "input": ""}', "field 'instruction' is missing"),
    ('{"instruction": "x", "output": ["a", "b"]}', "field 'output' must be a string, got a list"),
    ('{"instruction": "x", "output": 42}', "field 'output' must be a string, got a number"),
    ('{"instruction": "x", "output": null}', "field 'output' must be a string, got null"),
    ('{"instruction": "x", "input": 7, "output": "y"}', "field 'input' must be a string, got a number"),
    ('{"instruction": "x", "output": ""}', "field 'output' is empty"),
    ('{"instruction": "x", "output": "  \\n "}', "field 'output' is empty"),
    ('{"instruction": "", "output": "y"}', "field 'instruction' is empty"),
    ('{"instruction": "x", "output": "a\\ud800b"}', "not valid Unicode"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "looks like 'messages'"),
]

CONV_CASES = [
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
     "messages[1]: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "messages[1]: assistant 'content' is empty"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
     "messages[1]: field 'content' must be a string, got null"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     "messages[1]: field 'content' is missing"),
    ({"messages": [{"role": "user", "content": "x"}, "assistant: y"]}, "messages[1] must be an object"),
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": {"role": "user"}}, "field 'messages' must be a list"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "field 'role' is missing"),
    ({"messages": [{"role": 3, "content": "x"}]}, "field 'role' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "field 'weight' must be 0 or 1"),
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad, reason", ALPACA_CASES)
def test_bad_jsonl_record(tmp_path, bad, reason):
    p = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(GOOD), bad, json.dumps(GOOD)])
    with pytest.raises(DataError) as e:
        build([p])
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: ") and reason in msg, msg
    assert e.value.path == str(p) and e.value.line == 3
    assert isinstance(e.value, ValueError)
    b = build([p], skip_bad_records=True)
    rep = b.report["datasets"][0]
    assert (rep["records_read"], rep["bad_skipped"], rep["records"]) == (4, 1, 3)
    assert rep["bad_examples"] == [msg]


@pytest.mark.parametrize("bad, reason", [c for c in ALPACA_CASES if "invalid JSON" not in c[1]])
def test_bad_json_list_record(tmp_path, bad, reason):
    p = tmp_path / "bad.json"
    p.write_text("[" + ",\n".join([json.dumps(GOOD), json.dumps(GOOD), bad]) + "]", encoding="utf-8")
    with pytest.raises(DataError) as e:
        build([p])
    msg = str(e.value)
    assert msg.startswith(f"{p}[2]: ") and reason in msg, msg
    assert build([p], skip_bad_records=True).report["datasets"][0]["bad_skipped"] == 1


@pytest.mark.parametrize("bad, reason", CONV_CASES)
def test_bad_conversation(tmp_path, bad, reason):
    p = write_lines(tmp_path / "conv.jsonl", [json.dumps(GOOD_CONV), json.dumps(bad)])
    with pytest.raises(DataError) as e:
        build([DatasetSpec(p, format="messages")])
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: ") and reason in msg, msg
    assert build([DatasetSpec(p, format="messages")], skip_bad_records=True).report["datasets"][0]["bad_skipped"] == 1


def test_bad_sharegpt_role(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "x"}, {"from": "bing", "value": "y"}]}
    p = write_lines(tmp_path / "sg.jsonl", [json.dumps(rec)])
    with pytest.raises(DataError, match=r"sg\.jsonl:1: conversations\[1\]: unknown role 'bing'"):
        build([p])


def test_broken_utf8(tmp_path):
    p = tmp_path / "utf.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"utf\.jsonl:2: invalid UTF-8"):
        build([p])
    assert build([p], skip_bad_records=True).report["datasets"][0]["bad_skipped"] == 1
    j = tmp_path / "utf.json"
    j.write_bytes(b"[\n" + json.dumps(GOOD).encode() + b',\n{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(DataError, match=r"utf\.json:3: invalid UTF-8"):
        build([j], skip_bad_records=True)  # a JSON list that cannot be decoded is a file error


def test_bad_json_list_is_a_file_error_with_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + ",,\n]")
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        build([p], skip_bad_records=True)


@pytest.mark.parametrize("content, reason", [
    ("", "file is empty"),
    ("  \n\n ", "file is empty"),
    ("[]", "file is empty"),
    ('{"a": 1,\n "b": 2}', "single JSON object"),
    ('"text"', "no record is a JSON object"),
])
def test_empty_or_shapeless_files(tmp_path, content, reason):
    p = tmp_path / "f.json"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        build([p], skip_bad_records=True)
    assert str(e.value).startswith(str(p)) and reason in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        build([tmp_path / "nope.jsonl"])
    with pytest.raises(DataError, match="is a directory"):
        build([tmp_path])


def test_undetectable_format_is_an_error_even_when_skipping(tmp_path):
    p = write_lines(tmp_path / "weird.jsonl", [json.dumps({"q": "a", "a": "b"})] * 3)
    with pytest.raises(DataError) as e:
        build([p], skip_bad_records=True)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "['q', 'a']" in msg and "--fields instruction=q,output=a" in msg


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    p = write_lines(tmp_path / "allbad.jsonl", [json.dumps(GOOD)[:-3]] * 2 + ['{"instruction": "x", "output": 1}'])
    with pytest.raises(DataError, match=r"allbad\.jsonl: no usable records: all 3 of 3"):
        build([p], skip_bad_records=True)


def test_errors_in_later_files_stop_the_build_before_returning(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(GOOD)])
    bad = write_lines(tmp_path / "eval.jsonl", [json.dumps(GOOD), "{"])
    with pytest.raises(DataError, match=r"eval\.jsonl:2:"):
        build([good], eval_specs=[bad])


def test_bad_spec_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        DatasetSpec(tmp_path / "x.jsonl", format="chatml")
    with pytest.raises(ValueError, match="weight"):
        DatasetSpec(tmp_path / "x.jsonl", weight=-1)
    with pytest.raises(ValueError, match="exactly one"):
        DatasetSpec()


# ------------------------------------------------------------------------------------------------
# Property tests: anything -> loads or DataError, nothing else

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["instruction", "input", "output", "prompt", "completion", "text", "messages",
                         "conversations", "role", "content", "from", "value", "x"]), kids, max_size=4),
    max_leaves=12)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"instruction": json_values, "output": json_values}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "bot", 1]), "content": json_values}),
        max_size=4)}),
)


def _check(path, **kw):
    for skip in (False, True):
        try:
            b = build_dataset([path], TOK, max_seq_len=64, skip_bad_records=skip, **kw)
        except DataError:
            continue
        assert len(b.train) > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, min_size=0, max_size=5))
def test_random_json_records_load_or_raise_data_error(tmp_path, recs):
    p = tmp_path / "rand.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    _check(p)
    q = tmp_path / "rand.json"
    q.write_text(json.dumps(recs), encoding="utf-8")
    _check(q)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.lists(st.sampled_from(
    [b'{"text": "ok"}', b'{"text": ', b"\xff\xfe", b"\n", b"[", b"]", b'{"prompt": "a", "completion": "b"}',
     b"\xe2\x82", b"null", b'"\\ud800"', b'{"text": "\\udc00"}']), max_size=8).map(b"".join))
def test_random_bytes_load_or_raise_data_error(tmp_path, data):
    for name in ("bytes.jsonl", "bytes.json"):
        p = tmp_path / name
        p.write_bytes(data)
        _check(p)
