"""Data sources besides UTF-8 JSON/JSONL: Parquet and Arrow files, `datasets` save_to_disk directories,
Hub datasets in the local cache (offline), other text encodings, binary files. Every source goes
through the same detection, mapping and validation as JSONL, and errors name the file and the row."""

import gzip
import json
import random
import socket
import sys

import pytest

from fastsft.data import ByteTokenizer, DatasetSpec, build_dataset
from fastsft.data import formats
from fastsft.data.formats import iter_records, source_problem

from helpers import data_error as error
from helpers import stored, write_jsonl

TOK = ByteTokenizer()
RECS = [{"instruction": f"Add {k} and {k}.", "input": "", "output": f"{2 * k}"} for k in range(40)]




# ------------------------------------------------------------------------------------------------
# Parquet and Arrow


def write_parquet(path, records, **kw):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, **kw)
    return path


def test_parquet_gives_the_same_tokens_as_jsonl(tmp_path):
    want, _ = stored(write_jsonl(tmp_path / "a.jsonl", RECS))
    got, rep = stored(write_parquet(tmp_path / "a.parquet", RECS, row_group_size=7))
    assert got == want and rep["format"] == "alpaca" and rep["records_read"] == len(RECS)


def test_parquet_is_read_in_batches(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = write_parquet(tmp_path / "big.parquet", RECS * 5)
    pulled = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *a, **kw):
        for batch in real(self, *a, **kw):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    monkeypatch.setattr(formats, "_BATCH_ROWS", 16)
    records = iter_records(p)
    first = next(records)
    assert first.value == RECS[0] and first.index == 0
    assert pulled == [16]  # one batch of rows in Python objects, not the file
    assert sum(1 for _ in records) == len(RECS) * 5 - 1 and len(pulled) == -(-len(RECS) * 5 // 16)


def test_parquet_errors_name_the_file_and_row(tmp_path):
    recs = RECS[:5] + [{"instruction": "x", "input": "", "output": None}]
    p = write_parquet(tmp_path / "bad.parquet", recs)
    assert error(p) == f"{p}[5]: field 'output' must be a string, got null"
    q = write_parquet(tmp_path / "gsm.parquet", [{"question": "What is 2+2?", "answer": "4"}] * 3)
    assert "--fields instruction=question,output=answer" in error(q)  # same detection and hints as JSONL
    got, rep = stored(DatasetSpec(q, fields={"prompt": "question", "completion": "answer"}))
    assert rep["format"] == "prompt_completion" and len(got) == 3


def test_not_a_parquet_file_and_an_empty_one(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_text("hello")
    assert error(p).startswith(f"{p}: cannot read as Parquet")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    e = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), e)
    assert error(e) == f"{e}: no records (the data has no rows)"


def test_parquet_content_without_the_suffix_is_read_as_parquet(tmp_path):
    p = write_parquet(tmp_path / "data.bin", RECS[:3])
    assert len(stored(p)[0]) == 3


def test_missing_pyarrow_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    p = write_parquet(tmp_path / "a.parquet", RECS[:3])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    assert error(p) == f"{p}: reading Parquet files needs pyarrow, which is not installed: pip install 'fastsft[data]'"


def test_arrow_ipc_file_and_stream(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(RECS[:6])
    for name, new in (("f.arrow", pa.ipc.new_file), ("s.arrow", pa.ipc.new_stream)):
        with pa.OSFile(str(tmp_path / name), "wb") as sink, new(sink, table.schema) as w:
            w.write_table(table, max_chunksize=4)
        assert stored(tmp_path / name)[0] == stored(write_jsonl(tmp_path / "a.jsonl", RECS[:6]))[0]


# ------------------------------------------------------------------------------------------------
# datasets save_to_disk directories, directories of files


@pytest.fixture
def hf_datasets():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


CHAT = [{"messages": [{"role": "user", "content": f"hi {k}"}, {"role": "assistant", "content": f"yo {k}"}]}
        for k in range(12)]


def test_save_to_disk_dataset(tmp_path, hf_datasets):
    d = tmp_path / "ds"
    hf_datasets.Dataset.from_list(CHAT).save_to_disk(str(d), num_shards=3)
    got, rep = stored(d)
    assert rep["format"] == "messages" and got == stored(write_jsonl(tmp_path / "c.jsonl", CHAT))[0]


def test_save_to_disk_dataset_dict_and_its_splits(tmp_path, hf_datasets):
    d = tmp_path / "dd"
    ds = hf_datasets.Dataset.from_list(CHAT)
    hf_datasets.DatasetDict(train=ds, test=ds.select(range(3))).save_to_disk(str(d))
    assert len(stored(d)[0]) == 12  # the train split
    assert len(stored(d / "test")[0]) == 3
    e = tmp_path / "no_train"
    hf_datasets.DatasetDict(validation=ds, test=ds).save_to_disk(str(e))
    msg = error(e)
    assert msg.startswith(str(e)) and "splits validation, test and no 'train'" in msg and str(e / "validation") in msg


def test_save_to_disk_errors_name_the_shard_and_row(tmp_path, hf_datasets):
    d = tmp_path / "ds"
    bad = CHAT[:4] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    hf_datasets.Dataset.from_list(bad).save_to_disk(str(d))
    assert error(d) == (f"{d / 'data-00000-of-00001.arrow'}[4]: conversation has no assistant turn "
                        f"(nothing to train on)")


def test_directory_of_files_and_empty_directory(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    write_jsonl(d / "train.jsonl", RECS[:5])
    write_jsonl(d / "test.jsonl", RECS[5:7])
    assert len(stored(d)[0]) == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = error(empty)
    assert msg.startswith(str(empty)) and "is a directory with no data files" in msg


# ------------------------------------------------------------------------------------------------
# Hub datasets in the local cache, offline


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding dataset org/alpaca-mini (Parquet, train and test splits) and
    nothing reachable on the network."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--org--alpaca-mini"
    snap = repo / "snapshots" / "0123abcd"
    (snap / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    write_parquet(snap / "data" / "train-00000-of-00002.parquet", RECS[:20])
    write_parquet(snap / "data" / "train-00001-of-00002.parquet", RECS[20:])
    write_parquet(snap / "data" / "test-00000-of-00001.parquet", RECS[:3] + [{"instruction": "x", "output": ""}])
    (snap / "README.md").write_text("---\nlicense: mit\n---\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **kw):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_hub_id_in_the_cache(hub_cache, tmp_path):
    got, rep = stored("org/alpaca-mini")
    assert got == stored(write_jsonl(tmp_path / "a.jsonl", RECS))[0] and rep["format"] == "alpaca"
    assert error("org/alpaca-mini:test") == ("org/alpaca-mini/data/test-00000-of-00001.parquet[3]: "
                                             "field 'output' is empty")
    msg = error("org/alpaca-mini:validation")
    assert "no 'validation' split" in msg and "data/test-00000-of-00001.parquet" in msg


def test_hub_id_not_in_the_cache_is_one_line(hub_cache):
    msg = error("org/elsewhere")
    assert msg.startswith("org/elsewhere: no such file or directory, and no Hub dataset 'org/elsewhere' in the "
                          "local Hugging Face cache")
    assert "hf download org/elsewhere --repo-type dataset" in msg
    assert source_problem("org/elsewhere").startswith("no such file or directory")
    assert source_problem("org/alpaca-mini") is None
    assert error("nope/train.jsonl") == "nope/train.jsonl: no such file"  # a path, not a hub id


# ------------------------------------------------------------------------------------------------
# Encodings and binary files


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_byte_order_marks_are_read(tmp_path, encoding, suffix):
    recs = [{"instruction": "Grüße, 世界 ✓", "output": "ça va 😀"}] * 3
    text = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs) if suffix == ".jsonl"
            else json.dumps(recs, ensure_ascii=False))
    if encoding.endswith("-bom"):
        codec = encoding[:-4]
        data = "\ufeff".encode(codec) + text.encode(codec)
    else:
        data = text.encode(encoding)
    p = tmp_path / f"f{suffix}"
    p.write_bytes(data)
    assert stored(p)[0] == stored(write_jsonl(tmp_path / "u.jsonl", recs))[0]


@pytest.mark.parametrize("codec, named", [
    ("utf-16-le", "UTF-16 (little-endian) without a byte order mark"),
    ("utf-16-be", "UTF-16 (big-endian) without a byte order mark"),
    ("latin-1", "Latin-1/Windows-1252"),
    ("gb18030", "a legacy East Asian encoding"),
])
def test_other_encodings_are_named(tmp_path, codec, named):
    text = "中文指令" if codec == "gb18030" else "café crème, naïve"
    p = write_jsonl(tmp_path / "enc.jsonl", [{"instruction": text, "output": text}] * 5, encoding=codec)
    msg = error(p, skip_bad_records=True)
    assert msg.startswith(f"{p}: file is not UTF-8: it looks like {named}") and "re-save it as UTF-8" in msg
    assert "no record is a JSON object" not in msg and "byte 0 of the line" not in msg


def test_one_latin1_line_in_a_utf8_file_stays_a_line_error(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in RECS[:3])
                  + '{"instruction": "café", "output": "x"}\n'.encode("latin-1"))
    msg = error(p)
    assert msg.startswith(f"{p}:4: invalid UTF-8") and "Latin-1" in msg
    assert build_dataset([p], TOK, max_seq_len=512, skip_bad_records=True).report["datasets"][0]["bad_skipped"] == 1


@pytest.mark.parametrize("content, reason", [
    (random.Random(0).randbytes(4000), "not a text file: the bytes look binary"),
    (bytes(range(256)) * 8, "not a text file: the bytes look binary"),
    (gzip.compress(b'{"text": "x"}\n'), "not a text file: it is gzip-compressed"),
    (b"PK\x03\x04" + bytes(100), "not a text file: it is a zip archive"),
])
def test_binary_files_are_named(tmp_path, content, reason):
    p = tmp_path / "data.jsonl"
    p.write_bytes(content)
    assert error(p, skip_bad_records=True).startswith(f"{p}: {reason}")


def test_a_utf16_file_with_a_broken_byte_order_mark_is_a_data_error(tmp_path):
    p = tmp_path / "odd.jsonl"
    p.write_bytes(b"\xff\xfe" + '{"text": "x"}'.encode("utf-16-le") + b"\x00")  # odd byte count
    assert error(p).startswith(f"{p}: invalid UTF-16")
