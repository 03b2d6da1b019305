"""Fuzzing the loaders beyond test_bad_input.py's random records and bytes: explicit formats and field
mappings over wrong types, text with control characters / lone surrogates / BOMs / CRLF, JSON edge
literals (NaN, 1e999, 5000-digit integers, deep nesting), huge strings. Whatever the input, the loader
either returns a usable dataset or raises DataError naming the file (and the line or record when one
record is at fault); nothing else escapes."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsft.data import FORMATS, ByteTokenizer, DataError, DatasetSpec, build_dataset
from fastsft.data.formats import CANONICAL_FIELDS

TOK = ByteTokenizer()
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = ["instruction", "input", "output", "prompt", "completion", "text", "messages", "conversations", "role",
        "content", "from", "value", "question", "answer", "weight"]


def check_loads_or_data_error(path, n_lines: int, **spec):
    """Build ``path`` strictly and with skip_bad_records: a usable dataset, or a DataError located in it."""
    for skip in (False, True):
        try:
            bundle = build_dataset([DatasetSpec(path, **spec)], TOK, max_seq_len=64, skip_bad_records=skip,
                                   eval_fraction=0.2)
        except DataError as e:
            msg = str(e)
            assert msg.startswith(str(path)), msg
            assert "\n" not in msg, msg
            if e.line is not None:
                assert 1 <= e.line <= n_lines + 1, msg
            continue
        train = bundle.train
        assert len(train) > 0
        assert train.ids.max() < TOK.vocab_size and train.num_trained_tokens > 0
        assert train.lengths.max() <= 64


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(st.characters(codec="utf-8"), max_size=12) | st.text(max_size=6))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS), kids, max_size=4), max_leaves=10)
records = st.dictionaries(st.sampled_from(KEYS), values, max_size=5) | values


def dump(value) -> str:
    # json.dumps writes NaN/Infinity for non-finite floats, and lone surrogates as \ud800 escapes
    return json.dumps(value)


@FUZZ
@given(recs=st.lists(records, max_size=6), fmt=st.sampled_from(FORMATS + ("auto",)),
       fields=st.dictionaries(st.sampled_from(CANONICAL_FIELDS), st.sampled_from(KEYS), max_size=3),
       as_list=st.booleans())
def test_explicit_formats_and_field_mappings_over_wrong_types(tmp_path, recs, fmt, fields, as_list):
    p = tmp_path / ("f.json" if as_list else "f.jsonl")
    p.write_text(dump(recs) if as_list else "".join(dump(r) + "\n" for r in recs), encoding="utf-8")
    check_loads_or_data_error(p, len(recs), format=fmt, fields=fields or None)


line_pieces = st.sampled_from([
    '{"prompt": "a", "completion": "b"}', '{"text": "ok"}', "NaN", "Infinity", '{"text": NaN}',
    '{"prompt": "a", "completion": 1e999}', '{"text": ' + "1" * 5000 + "}", "[" * 3000 + "]" * 3000,
    '{"text": ' + "[" * 50000, '{"text": "x", "text": 3}', "\x00", "\ufeff", "\r", "\\", '"\\ud800"',
    '{"text": "\\udfff\\ud800"}', '{"messages": [{"role": "assistant", "content": "\u2028"}]}', " ", "{}", "[]",
])
lines = st.lists(st.lists(line_pieces | st.text(max_size=10), max_size=3).map("".join), max_size=8)


@FUZZ
@given(lines=lines, newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(),
       suffix=st.sampled_from([".jsonl", ".json"]), surrogates=st.sampled_from(["surrogatepass", "replace"]))
def test_odd_text_and_json_literals(tmp_path, lines, newline, bom, suffix, surrogates):
    p = tmp_path / f"odd{suffix}"
    # lone surrogates in the text become invalid UTF-8 bytes with "surrogatepass"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode("utf-8", surrogates))
    check_loads_or_data_error(p, len(lines))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1_000, 300_000), where=st.sampled_from(["prompt", "completion", "key", "bad_json"]),
       char=st.sampled_from(["x", "\u00e9", "\U0001f600", " "]))
def test_huge_strings(tmp_path, n, where, char):
    big = char * n
    rec = {"prompt": "p", "completion": "c"}
    if where == "key":
        rec[big] = "v"
    elif where == "bad_json":
        rec = None
    else:
        rec[where] = big
    p = tmp_path / "huge.jsonl"
    text = dump(rec) if rec is not None else '{"prompt": "' + big
    p.write_text(text + "\n" + dump({"prompt": "q", "completion": "a"}) + "\n", encoding="utf-8")
    check_loads_or_data_error(p, 2)


def test_multi_megabyte_record_is_truncated_or_dropped(tmp_path):
    big = "y" * 3_000_000
    p = tmp_path / "mb.jsonl"
    p.write_text(dump({"prompt": "a", "completion": big}) + "\n" + dump({"prompt": big, "completion": "b"}) + "\n")
    b = build_dataset([p], TOK, max_seq_len=64)
    rep = b.report["datasets"][0]
    assert (rep["truncated"], rep["dropped_truncated"], len(b.train)) == (1, 1, 1)


def test_json_number_past_the_digit_limit_is_a_data_error(tmp_path):
    """Python refuses to parse integers of more than 4300 digits with a bare ValueError."""
    p = tmp_path / "big.jsonl"
    p.write_text(dump({"prompt": "a", "completion": "b"}) + '\n{"prompt": "a", "completion": ' + "9" * 5000 + "}\n")
    try:
        build_dataset([p], TOK, max_seq_len=64)
    except DataError as e:
        assert str(e).startswith(f"{p}:2: invalid JSON"), str(e)
    else:
        raise AssertionError("no DataError")
    q = tmp_path / "big.json"
    q.write_text('[{"prompt": "a", "completion": ' + "9" * 5000 + "}]")
    try:
        build_dataset([q], TOK, max_seq_len=64)
    except DataError as e:
        assert str(e).startswith(f"{q}: invalid JSON"), str(e)
    else:
        raise AssertionError("no DataError")
