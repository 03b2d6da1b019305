"""Reading training data and turning records into canonical examples.

Sources (`iter_records`; every source goes through the same format detection, field mapping and
validation, and errors name the file and the line, JSON-list index or Parquet/Arrow row):
- a JSON file (a list of objects) or JSONL (one object per line; blank lines are ignored), in UTF-8
  with or without a byte order mark, or UTF-16/UTF-32 with one. Another encoding (UTF-16 without a
  BOM, Latin-1, GBK, ...) or a binary file is one error naming what the bytes look like;
- a Parquet (`.parquet`) or Arrow (`.arrow`) file, read `_BATCH_ROWS` rows at a time;
- a `datasets` `save_to_disk` directory (a Dataset, or a DatasetDict: its `train` split; give the
  split's directory for another), or a directory of such files (its `train` files, see `_pick_files`);
- a Hub dataset id `org/name[/subset][:split]` (split `train` by default) that is already in the local
  Hugging Face cache (`hf download org/name --repo-type dataset`, or an earlier `datasets.load_dataset`).
  The network is never used, whatever HF_HUB_OFFLINE says; an id not in the cache is an error saying
  how to fetch it.
Parquet and Arrow need pyarrow (`pip install 'fastsft[data]'`).

Field mapping canonical_field -> source (``--fields instruction=question,output=answer``), applied
before detection. A source is a key or a path into the record:

    question              a top-level key (a key that itself holds dots or brackets is used as it is
                          when the record has it)
    meta.question         a key of a nested object
    instances[0].output   an element of a list; ``instances.0.output`` is the same, [-1] the last
    instances[*].output   every element: the record becomes one example per element of `instances`;
                          fields mapped without [*] come from the parent record, the same in each
    meta["odd.key"]       a quoted key (one that holds dots or brackets)

Every [*] of a mapping must stand on the same list (one list is exploded per record). from/value
(sharegpt) and role/content (messages) name keys inside each turn. Self-Instruct seed tasks
``{id, name, instruction, instances: [{input, output}], is_classification}`` map with
``--fields instruction=instruction,input=instances[*].input,output=instances[*].output``. A path
missing from a record is "field '<path>' not found: <where it stopped>", located at the record.
When no format is detected, the error suggests a mapping built only from string fields whose names or
contents look like prompts and responses (never ids, names, categories, numbers or slug-like labels),
or says in words that the records have prompts but no responses to train on.

Canonical examples (what `normalize` returns; templates.py renders them):
    alpaca             {"instruction": str, "input": str, "output": str}      ("input" may be "")
    prompt_completion  {"prompt": str, "completion": str}
    sharegpt, messages {"messages": [{"role": "system"|"user"|"assistant", "content": str,
                                      "train": bool}, ...]}
    text               {"text": str}
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

from .errors import DataError, RecordError

FORMATS = ("alpaca", "prompt_completion", "sharegpt", "messages", "text")
# Canonical field names a mapping may target. from/value (sharegpt) and role/content (messages)
# are keys inside each turn.
CANONICAL_FIELDS = ("instruction", "input", "output", "prompt", "completion", "conversations",
                    "messages", "text", "from", "value", "role", "content")
_TURN_KEYS = ("from", "value", "role", "content")
_FORMAT_HELP = ("alpaca (instruction, output[, input]), prompt_completion (prompt, completion), "
                "sharegpt (conversations), messages (messages), text (text)")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_DETECT_SAMPLE = 100  # records looked at to detect a file's format (majority vote)
# Parquet/Arrow rows turned into Python objects at a time: reading holds one batch of records, not
# the file (what stays is the rendered text and then the token store)
_BATCH_ROWS = 1024
_SNIFF_BYTES = 1 << 16  # bytes read to tell the encoding or a binary file: hundreds of typical records
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")
_NOT_DATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json", "config.json")
_EXTRA = "pip install 'fastsft[data]'"


# ------------------------------------------------------------------------------------------------
# Reading sources


@dataclass
class RawRecord:
    """One record as read: `value` is the parsed JSON (or Parquet/Arrow row), or None with `error` set
    (bad JSON/UTF-8)."""
    value: Any
    line: int | None = None   # 1-based line (JSONL)
    index: int | None = None  # 0-based index (JSON list, in-memory records) or row (Parquet/Arrow)
    error: RecordError | None = None
    file: str | None = None   # the file it came from (a directory or Hub id stands for several)
    part: str | None = None   # the element of an exploded list, e.g. "instances[2]" (pipeline)

    def where(self, path: str) -> dict:
        return {"path": self.file or path, "line": self.line, "index": self.index}


def _json_loads(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise RecordError("invalid JSON: nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # e.g. an integer literal past Python's 4300-digit conversion limit
        raise RecordError(f"invalid JSON: {_first_clause(e)}") from None


def _first_clause(e: Exception) -> str:
    return str(e).split(";")[0].strip() or type(e).__name__


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_records(path: str | Path) -> list[RawRecord]:
    """Every record of a source (see `iter_records`) as a list."""
    return list(iter_records(path))


def iter_records(source: str | Path) -> Iterator[RawRecord]:
    """The records of a file, directory or cached Hub dataset, streamed. A source that cannot be
    found raises DataError at once; file-level problems (unreadable, empty, not UTF-8, a JSON list
    that does not parse, no pyarrow) raise DataError while iterating; per-record problems come back
    as RawRecord.error."""
    name = str(source)
    files = resolve_source(source)

    def records() -> Iterator[RawRecord]:
        empty = True
        for path, shown in files:
            for raw in _iter_file(path, shown):
                raw.file = shown
                empty = False
                yield raw
        if empty:
            raise DataError("no records (the data has no rows)", path=name)
    return records()


def records_from_memory(records: Iterable[Any]) -> list[RawRecord]:
    return [RawRecord(v, index=i) for i, v in enumerate(records)]


def source_problem(source: str | Path) -> str | None:
    """Why `source` cannot be a dataset (one line, without its name), or None. Finds the files only:
    no record is read (for preflight checks)."""
    try:
        resolve_source(source)
    except DataError as e:
        return e.reason
    return None


# ---- sources -> files

# org/name, then an optional subset (a directory of the repo) and :split
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<subset>[\w.-]+))?(?::(?P<split>[\w.-]+))?")
_SPLITS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
           "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test"}


def resolve_source(source: str | Path) -> list[tuple[Path, str]]:
    """The files a source stands for, each with the name errors give it; DataError when there is none."""
    name = str(source)
    p = Path(name).expanduser()
    if p.is_dir():
        return _directory_files(p, name)
    if p.exists():
        return [(p, name)]
    m = _HUB_ID.fullmatch(name)
    if m is None or name.lower().endswith(_DATA_SUFFIXES + (".csv", ".tsv", ".txt", ".gz", ".zip")):
        raise DataError("no such file", path=name)
    return _hub_files(m["repo"], m["subset"], m["split"] or "train", name)


def _json_file(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path.name}: {_first_line(e)}", path=name) from None


def _directory_files(d: Path, name: str) -> list[tuple[Path, str]]:
    if (d / "dataset_dict.json").is_file():  # datasets DatasetDict.save_to_disk: one directory per split
        splits = _json_file(d / "dataset_dict.json", name).get("splits") or []
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise DataError(f"is a `datasets` DatasetDict with splits {', '.join(map(str, splits)) or '(none)'} "
                            f"and no 'train'; give the split's directory, e.g. {Path(name) / str(splits[0] if splits else 'SPLIT')}",
                            path=name)
        return _saved_dataset_files(d / split, str(Path(name) / split))
    if (d / "state.json").is_file():  # datasets Dataset.save_to_disk
        return _saved_dataset_files(d, name)
    return [(f, str(Path(name) / f.relative_to(d))) for f in _pick_files(
        d, "train", None, name, what="is a directory",
        how="give the file itself, or a `datasets` save_to_disk directory")]


def _saved_dataset_files(d: Path, name: str) -> list[tuple[Path, str]]:
    state = _json_file(d / "state.json", name)
    try:
        files = [f["filename"] for f in state["_data_files"]]
    except (KeyError, TypeError):
        raise DataError("state.json lists no `_data_files`; is this a `datasets` save_to_disk directory?",
                        path=name) from None
    return [(d / f, str(Path(name) / f)) for f in files]


def _split_of(rel: str) -> str | None:
    return next((_SPLITS[t] for t in re.findall(r"[a-z]+", rel.lower()) if t in _SPLITS), None)


def _subset_of(rel: Path) -> str:
    dirs = [d for d in rel.parts[:-1] if d != "data" and _split_of(d) is None]
    return dirs[0] if dirs else ""


def _pick_files(root: Path, split: str, subset: str | None, name: str, *, what: str, how: str) -> list[Path]:
    """The data files of `split` under `root`: those whose path names the split (train-00000-of-00002.parquet,
    data/test.jsonl, train/0000.arrow; dev/val/valid mean validation), or, for train, those that name no
    split when none does; one subset (the first directory that is not data/ or a split) at a time."""
    files = sorted(f for f in root.rglob("*")
                   if f.is_file() and f.name.lower().endswith(_DATA_SUFFIXES) and f.name not in _NOT_DATA
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    if not files:
        raise DataError(f"{what} with no data files (.parquet, .jsonl, .json, .arrow) and no `datasets` "
                        f"save_to_disk files (state.json, dataset_dict.json); {how}", path=name)
    rel = {f: f.relative_to(root) for f in files}
    subsets = sorted({_subset_of(r) for r in rel.values()})
    if subset is not None:
        files = [f for f in files if _subset_of(rel[f]) == subset]
        if not files:
            named = ", ".join(s for s in subsets if s)
            raise DataError(f"{what} with no subset {subset!r} ({'subsets: ' + named if named else 'it has none'})",
                            path=name)
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(rel[f].as_posix()), []).append(f)
    chosen = by_split.get(split) or (by_split.get(None) if split == "train" else None)
    if not chosen:
        shown = ", ".join(rel[f].as_posix() for f in files[:6]) + (", ..." if len(files) > 6 else "")
        raise DataError(f"{what} with no {split!r} split (its data files: {shown}); {how}", path=name)
    groups = sorted({_subset_of(rel[f]) for f in chosen})
    if len(groups) > 1:
        raise DataError(f"{what} with several subsets ({', '.join(g or '(top level)' for g in groups)}) for "
                        f"split {split!r}; {how}", path=name)
    return chosen


def _hf_cache() -> Path:
    """Hugging Face's hub cache, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_files(repo: str, subset: str | None, split: str, name: str) -> list[tuple[Path, str]]:
    cache = _hf_cache()
    root = cache / ("datasets--" + repo.replace("/", "--"))
    snapshot = None
    ref = root / "refs" / "main"
    if ref.is_file():
        snapshot = root / "snapshots" / ref.read_text(encoding="utf-8").strip()
    if (snapshot is None or not snapshot.is_dir()) and (root / "snapshots").is_dir():
        snaps = sorted((s for s in (root / "snapshots").iterdir() if s.is_dir()), key=lambda s: s.stat().st_mtime)
        snapshot = snaps[-1] if snaps else None
    if snapshot is None or not snapshot.is_dir():
        raise DataError(f"no such file or directory, and no Hub dataset {repo!r} in the local Hugging Face cache "
                        f"({cache}); fastsft reads Hub datasets offline only: fetch it first, e.g. "
                        f"`hf download {repo} --repo-type dataset`", path=name)
    files = _pick_files(snapshot, split, subset, name, what="is a cached Hub dataset",
                        how=f"name one as {repo}[/SUBSET][:SPLIT]")
    return [(f, f"{repo}/{f.relative_to(snapshot).as_posix()}") for f in files]


# ---- files -> records


def _iter_file(p: Path, name: str) -> Iterator[RawRecord]:
    try:
        with open(p, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise DataError("no such file", path=name) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a data file", path=name) from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path=name) from None
    suffix = p.suffix.lower()
    if head.startswith(b"PAR1") or suffix == ".parquet":
        return _iter_parquet(p, name)
    if head.startswith(b"ARROW1") or suffix == ".arrow":
        return _iter_arrow(p, name)
    return _iter_text(p, name, head)


# Byte order marks, longest first (a UTF-32-LE BOM starts with the UTF-16-LE one)
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32"), (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32"),
         (b"\xef\xbb\xbf", "utf-8", "UTF-8"), (b"\xff\xfe", "utf-16-le", "UTF-16"),
         (b"\xfe\xff", "utf-16-be", "UTF-16"))
_BINARY_MAGIC = ((b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
                 (b"PK\x03\x04", "a zip archive; unpack it first"),
                 (b"BZh", "bzip2-compressed; decompress it first (bunzip2)"),
                 (b"\xfd7zXZ\x00", "xz-compressed; decompress it first (unxz)"),
                 (b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it first (unzstd)"),
                 (b"SQLite format 3\x00", "an SQLite database"), (b"%PDF-", "a PDF document"),
                 (b"\x93NUMPY", "a NumPy array file"))
_CONTROL = bytes(c for c in range(32) if c not in b"\t\n\r\x0c") + b"\x7f"


def _legacy_text(blob: bytes) -> tuple[str, str] | None:
    """(what, iconv name) for bytes that are not UTF-8 but look like text in a legacy encoding; None
    when they look binary (control bytes)."""
    if len(blob) - len(blob.translate(None, _CONTROL)) > len(blob) // 50:
        return None
    runs = [len(r) for r in re.findall(rb"[\x80-\xff]+", blob)]
    if sum(r for r in runs if r >= 2) * 10 >= sum(runs) * 6:  # non-ASCII bytes mostly in pairs: multi-byte
        return "a legacy East Asian encoding (GBK/GB18030, Big5, Shift-JIS, EUC-KR, ...)", "GB18030"
    return "Latin-1/Windows-1252", "CP1252"


def _not_utf8(head: bytes) -> tuple[str, str | None] | None:
    """(why, iconv name or None for binary) when a file whose first bytes are `head` (no BOM) is not
    UTF-8 text; None when most of its first lines are UTF-8 (a few bad lines are per-line errors)."""
    n = len(head)
    if head.count(0):
        if n >= 8:
            q = [head[k::4].count(0) / len(head[k::4]) for k in range(4)]
            if min(q[1:]) > 0.9 and q[0] < 0.5:
                return "it looks like UTF-32 (little-endian) without a byte order mark", "UTF-32LE"
            if min(q[:3]) > 0.9 and q[3] < 0.5:
                return "it looks like UTF-32 (big-endian) without a byte order mark", "UTF-32BE"
        if n >= 4:
            even, odd = head[0::2].count(0) / len(head[0::2]), head[1::2].count(0) / len(head[1::2])
            if odd > 0.3 and even < 0.05:  # ASCII characters as (c, 0) pairs
                return "it looks like UTF-16 (little-endian) without a byte order mark", "UTF-16LE"
            if even > 0.3 and odd < 0.05:
                return "it looks like UTF-16 (big-endian) without a byte order mark", "UTF-16BE"
        if head.count(0) * 100 > n:  # NUL bytes are no part of any text file
            return "binary", None
    lines = head.split(b"\n")
    truncated = n == _SNIFF_BYTES
    lines = [ln for ln in (lines[:-1] if truncated and len(lines) > 1 else lines) if ln.strip()][:200]
    bad = []
    for ln in lines:
        try:
            ln.decode("utf-8")
        except UnicodeDecodeError as e:
            if not (truncated and len(lines) == 1 and e.reason == "unexpected end of data"):
                bad.append(ln)
    if not bad or 2 * len(bad) <= len(lines):
        return None
    legacy = _legacy_text(b"\n".join(bad))
    if legacy is None:
        return "binary", None
    return f"it looks like {legacy[0]}", legacy[1]


def _iter_text(p: Path, name: str, head: bytes) -> Iterator[RawRecord]:
    bom, codec, label = next(((b, c, lb) for b, c, lb in _BOMS if head.startswith(b)), (b"", "utf-8", "UTF-8"))
    if not bom:
        for magic, what in _BINARY_MAGIC:
            if head.startswith(magic):
                raise DataError(f"not a text file: it is {what}", path=name)
        found = _not_utf8(head)
        if found is not None:
            what, iconv = found
            if iconv is None:
                raise DataError("not a text file: the bytes look binary; expected JSON or JSONL text (UTF-8), "
                                "a Parquet or an Arrow file", path=name)
            raise DataError(f"file is not UTF-8: {what}; re-save it as UTF-8 "
                            f"(e.g. iconv -f {iconv} -t UTF-8 IN > OUT)", path=name)
    jsonl = p.suffix.lower() == ".jsonl"
    if codec == "utf-8":
        try:
            f = open(p, "rb")
        except OSError as e:
            raise DataError(f"cannot read file: {e.strerror or e}", path=name) from None
        with f:
            f.seek(len(bom))
            yield from _iter_json_stream(f, name, jsonl)
        return
    try:
        text = p.read_bytes()[len(bom):].decode(codec)
    except UnicodeDecodeError as e:
        raise DataError(f"invalid {label} (byte offset {e.start + len(bom)}) in a file that starts with a "
                        f"{label} byte order mark", path=name) from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path=name) from None
    yield from _iter_json_stream(io.BytesIO(text.encode("utf-8", "surrogatepass")), name, jsonl)


def _iter_json_stream(f: BinaryIO, name: str, jsonl: bool) -> Iterator[RawRecord]:
    start = f.tell()
    first = b""
    while not first:
        chunk = f.read(_SNIFF_BYTES)
        if not chunk:
            raise DataError("file is empty", path=name)
        first = chunk.lstrip()[:1]
    f.seek(start)
    if first == b"[":
        data = f.read()
        records = _read_json_list(data, name, jsonl_fallback=jsonl)
        if records is not None:
            if not records:
                raise DataError("file is empty (a JSON list with no records)", path=name)
            yield from records
            return
        f, start = io.BytesIO(data), 0
    yield from _read_jsonl(f, name, start, check_single_object=first == b"{")


def _encoding_hint(data: bytes) -> str:
    legacy = _legacy_text(data)
    return f"; the file may be {legacy[0]}, not UTF-8" if legacy else ""


def _read_json_list(data: bytes, name: str, jsonl_fallback: bool) -> list[RawRecord] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if jsonl_fallback:
            return None
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"invalid UTF-8 (byte offset {e.start}){_encoding_hint(data)}", path=name, line=line) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if jsonl_fallback:
            return None
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=name, line=e.lineno) from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", path=name) from None
    except ValueError as e:  # not a JSONDecodeError: e.g. an integer past the 4300-digit limit
        if jsonl_fallback:
            return None
        raise DataError(f"invalid JSON: {_first_clause(e)}", path=name) from None
    if not isinstance(value, list):
        if jsonl_fallback:
            return None
        raise DataError("expected a JSON list of records", path=name)
    return [RawRecord(v, index=i) for i, v in enumerate(value)]


def _is_single_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


def _read_jsonl(f: BinaryIO, name: str, start: int, check_single_object: bool) -> Iterator[RawRecord]:
    for lineno, raw in enumerate(iter(f.readline, b""), start=1):
        raw = raw.strip()
        if not raw:
            continue
        rec = _parse_line(raw, lineno)
        if check_single_object:
            check_single_object = False
            # one JSON object pretty-printed over several lines: say so instead of "bad JSON on line 1"
            if rec.error is not None and raw.startswith(b"{"):
                pos = f.tell()
                f.seek(start)
                whole = f.read()
                f.seek(pos)
                if _is_single_object(whole):
                    raise DataError("file holds a single JSON object; expected a JSON list of records or "
                                    "one JSON object per line (JSONL)", path=name)
        yield rec


def _parse_line(raw: bytes, lineno: int) -> RawRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawRecord(None, line=lineno, error=RecordError(
            f"invalid UTF-8 (byte {e.start} of the line){_encoding_hint(raw)}"))
    try:
        return RawRecord(_json_loads(text), line=lineno)
    except json.JSONDecodeError as e:
        return RawRecord(None, line=lineno, error=RecordError(f"invalid JSON: {e.msg} (column {e.colno})"))
    except RecordError as e:
        return RawRecord(None, line=lineno, error=e)


def _pyarrow(what: str, name: str):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"reading {what} needs pyarrow, which is not installed: {_EXTRA}", path=name) from None
    return pa


def _iter_parquet(p: Path, name: str) -> Iterator[RawRecord]:
    pa = _pyarrow("Parquet files", name)
    try:
        batches = pa.parquet.ParquetFile(str(p)).iter_batches(batch_size=_BATCH_ROWS)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"cannot read as Parquet: {_first_line(e)}", path=name) from None
    return _arrow_rows(pa, batches, name, "Parquet")


def _iter_arrow(p: Path, name: str) -> Iterator[RawRecord]:
    """Arrow IPC: the stream format (`datasets` save_to_disk and cache files) or the file format."""
    pa = _pyarrow("Arrow files", name)
    try:
        source = pa.memory_map(str(p))
        try:
            batches = iter(pa.ipc.open_stream(source))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"cannot read as Arrow: {_first_line(e)}", path=name) from None
    return _arrow_rows(pa, batches, name, "Arrow")


def _arrow_rows(pa, batches: Iterator, name: str, what: str) -> Iterator[RawRecord]:
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"cannot read {what} data after row {row}: {_first_line(e)}", path=name) from None
        if batch is None:
            return
        for k in range(0, batch.num_rows, _BATCH_ROWS):
            try:
                values = batch.slice(k, _BATCH_ROWS).to_pylist()
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise DataError(f"cannot convert {what} rows {row}..: {_first_line(e)}", path=name) from None
            for value in values:
                yield RawRecord(value, index=row)
                row += 1


# ------------------------------------------------------------------------------------------------
# Field mapping: paths into records


class _NotFound(Exception):
    """A path that does not resolve; `reason` says where it stopped (None: a plain key is missing)."""

    def __init__(self, reason: str | None):
        super().__init__(reason)
        self.reason = reason


@functools.lru_cache(maxsize=512)
def _parse_path(src: str) -> tuple:
    """``instances[0].output`` / ``instances.0.output`` / ``a[*].b`` / ``a["k.x"]`` -> steps: str keys
    (a digit key also indexes a list), int indices, "*" for every element."""
    steps: list = []
    pos, n = 0, len(src)
    while pos < n:
        c = src[pos]
        if c == "[":
            end = src.find("]", pos)
            if end < 0:
                raise DataError(f"field path {src!r}: '[' is never closed")
            inner = src[pos + 1:end].strip()
            if inner == "*":
                steps.append("*")
            elif len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                steps.append(inner[1:-1])
            else:
                try:
                    steps.append(int(inner))
                except ValueError:
                    raise DataError(f"field path {src!r}: [{inner}] must be an index (0, -1), * or a "
                                    f"quoted key") from None
            pos = end + 1
            if pos < n and src[pos] not in ".[":
                raise DataError(f"field path {src!r}: expected '.' or '[' after ']'")
            continue
        if c == ".":
            if pos == 0 or pos + 1 >= n or src[pos + 1] in ".[":
                raise DataError(f"field path {src!r}: empty key around '.'")
            pos += 1
        m = re.compile(r"[^.\[\]]+").match(src, pos)
        if m is None:
            raise DataError(f"field path {src!r}: unexpected {src[pos]!r}")
        steps.append(m.group())
        pos = m.end()
    if steps.count("*") > 1:
        raise DataError(f"field path {src!r}: only one [*] per path")
    return tuple(steps)


def _path_str(steps: Iterable) -> str:
    out = ""
    for s in steps:
        if isinstance(s, int) or s == "*":
            out += f"[{s}]"
        elif re.fullmatch(r"[^.\[\]]+", s):
            out += f".{s}" if out else s
        else:
            out += f"[{json.dumps(s)}]"
    return out


def _explode_prefix(fields: Mapping[str, str]) -> tuple | None:
    """The steps up to the list a mapping explodes with [*] (None when it explodes nothing)."""
    for canon, src in fields.items():
        if canon not in _TURN_KEYS:
            steps = _parse_path(src)
            if "*" in steps:
                return steps[:steps.index("*")]
    return None


def _resolve(record: dict, src: str, element: int | None) -> Any:
    if src in record:  # an exact key wins: keys that hold dots or brackets keep working
        return record[src]
    steps = _parse_path(src)
    if len(steps) == 1 and isinstance(steps[0], str) and steps[0] != "*":
        raise _NotFound(None)
    cur: Any = record
    done: list = []
    for step in steps:
        if step == "*":
            step = 0 if element is None else element
        here = repr(_path_str(done)) if done else "the record"
        if isinstance(cur, list):
            if isinstance(step, str):
                if not re.fullmatch(r"-?\d+", step):
                    raise _NotFound(f"{here} is a list, not an object with key {step!r}")
                step = int(step)
            if not -len(cur) <= step < len(cur):
                raise _NotFound(f"{here} has {len(cur)} element{'' if len(cur) == 1 else 's'}, no [{step}]")
        elif isinstance(cur, dict):
            step = str(step)
            if step not in cur:
                keys = ", ".join(repr(k) for k in list(cur)[:12]) + (", ..." if len(cur) > 12 else "")
                raise _NotFound(f"{here} has no key {step!r} (keys: {keys or 'none'})")
        else:
            raise _NotFound(f"{here} is {_json_type(cur)}, not an object or a list")
        cur = cur[step]
        done.append(step)
    return cur


def _map_record(record: dict, fields: Mapping[str, str], element: int | None) -> tuple[dict, dict]:
    """(record with canonical keys taken from their sources, {canonical: why its path is not found})."""
    out = dict(record)
    missing: dict[str, str] = {}
    for canon, src in fields.items():
        if canon in _TURN_KEYS:
            continue
        try:
            out[canon] = _resolve(record, src, element)
        except _NotFound as e:
            out.pop(canon, None)  # the mapping names the source; a same-named canonical key is not used
            if e.reason:
                missing[canon] = e.reason
    return out, missing


def check_fields(fields: Mapping[str, str] | None, where: str = "fields") -> dict[str, str]:
    """Validate a canonical -> source field mapping (sources may be paths, see the module docstring)."""
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise DataError(f"{where}: field mapping must be a dict canonical -> source, "
                        f"got {type(fields).__name__}")
    out = {}
    exploded: dict[tuple, str] = {}
    for canon, src in fields.items():
        if canon not in CANONICAL_FIELDS:
            raise DataError(f"{where}: unknown canonical field {canon!r} in field mapping "
                            f"(known: {', '.join(CANONICAL_FIELDS)})")
        if not isinstance(src, str) or not src:
            raise DataError(f"{where}: field mapping {canon!r} -> {src!r}: source must be a non-empty string")
        if canon not in _TURN_KEYS:
            try:
                steps = _parse_path(src)
            except DataError as e:
                raise DataError(f"{where}: {e.reason}") from None
            if "*" in steps:
                exploded.setdefault(steps[:steps.index("*")], src)
        out[canon] = src
    if len(exploded) > 1:
        a, b = (_path_str(k) + "[*]" for k in list(exploded)[:2])
        raise DataError(f"{where}: the field mapping explodes both {a!r} and {b!r}; every [*] must stand on "
                        f"the same list (one example per element of one list)")
    return out


def apply_fields(record: dict, fields: Mapping[str, str], element: int | None = None) -> dict:
    """Copy of `record` with canonical keys taken from their mapped sources (keys or paths; with [*],
    element `element`, or the first one when None; from/value/role/content mappings apply inside
    turns, see `normalize`)."""
    if not fields:
        return record
    return _map_record(record, fields, element)[0]


def record_elements(record: Any, fields: Mapping[str, str]) -> list[int | None]:
    """The examples a record gives: [None] (itself) unless the mapping explodes a list with [*], then
    one element index per element; RecordError when that list is missing, not a list, or empty."""
    prefix = _explode_prefix(fields) if fields else None
    if prefix is None or not isinstance(record, dict):
        return [None]
    label = _path_str(prefix)
    try:
        value = _resolve(record, label, None)
    except _NotFound as e:
        raise RecordError(f"field {label!r} not found: {e.reason or f'the record has no key {label!r}'}") from None
    if not isinstance(value, list):
        raise RecordError(f"field {label!r} must be a list (the field mapping takes one example per "
                          f"element), got {_json_type(value)}")
    if not value:
        raise RecordError(f"field {label!r} is an empty list (no example to take from it)")
    return list(range(len(value)))


def field_number(record: Any, src: str, element: int | None = None, *, role: str = "score") -> float:
    """The number at field path ``src`` of a record (``[*]`` takes element ``element``): an int or float
    (or a string that spells one), finite. RecordError naming the path and why otherwise."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    try:
        value = _resolve(record, src, element)
    except _NotFound as e:
        raise RecordError(f"field {src!r} ({role}) not found: {e.reason or f'the record has no key {src!r}'}") \
            from None
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        shown = value if isinstance(value, str) and len(value) <= 40 else _json_type(value)
        raise RecordError(f"field {src!r} ({role}) must be a number, got {shown!r}")
    if not math.isfinite(number):
        raise RecordError(f"field {src!r} ({role}) must be a finite number, got {value!r}")
    return float(number)


def element_label(fields: Mapping[str, str], element: int | None) -> str | None:
    """``instances[2]``: which element of the exploded list an example is (None when not exploding)."""
    prefix = _explode_prefix(fields) if fields and element is not None else None
    return None if prefix is None else f"{_path_str(prefix)}[{element}]"


def _concrete(src: str, element: int | None) -> str:
    """The source path of one element: ``instances[*].output`` -> ``instances[2].output``."""
    if element is None or src.find("*") < 0:
        return src
    try:
        steps = _parse_path(src)
    except DataError:
        return src
    return _path_str(element if s == "*" else s for s in steps) if "*" in steps else src


# ------------------------------------------------------------------------------------------------
# Format detection


def detect_format(record: Any) -> str | None:
    """Format of one (already field-mapped) record from its keys, or None."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def detection_sample(records: Iterator[RawRecord], fields: Mapping[str, str]) -> list[RawRecord]:
    """The head of a record stream that `detect_file_format` looks at: up to the _DETECT_SAMPLE-th
    record whose format is detectable (all of them when fewer are); the caller goes on with the rest."""
    head, votes = [], 0
    for raw in records:
        head.append(raw)
        if raw.error is None and isinstance(raw.value, dict) and detect_format(apply_fields(raw.value, fields)):
            votes += 1
            if votes >= _DETECT_SAMPLE:
                break
    return head


def detect_file_format(raws: Iterable[RawRecord], fields: Mapping[str, str], path: str) -> str:
    """Majority format of the first detectable records. DataError when there is none: a mapped field
    found in no record is "field ... not found" (at the first record); otherwise the keys seen and a
    mapping hint, or that the records have no responses to train on."""
    votes: Counter = Counter()
    first: dict[str, int] = {}
    seen_keys: list[str] = []
    objects: list[RawRecord] = []
    found: set[str] = set()
    first_error: RawRecord | None = None
    for raw in raws:
        if raw.error is not None or not isinstance(raw.value, dict):
            if raw.error is not None and first_error is None:
                first_error = raw
            continue
        if len(objects) < 20:
            seen_keys.extend(k for k in raw.value if k not in seen_keys)
        objects.append(raw)
        mapped, _ = _map_record(raw.value, fields, None)
        found.update(c for c in fields if c in mapped)
        fmt = detect_format(mapped)
        if fmt is not None:
            votes[fmt] += 1
            first.setdefault(fmt, len(first))
            if sum(votes.values()) >= _DETECT_SAMPLE:
                break
    if votes:
        return max(votes, key=lambda f: (votes[f], -first[f]))
    if not objects:
        if first_error is not None:
            e = first_error.error
            raise DataError(f"cannot detect the data format: no record is a JSON object (first: {e.reason})",
                            path=first_error.file or path, line=first_error.line, index=first_error.index)
        raise DataError("cannot detect the data format: no record is a JSON object", path=path)
    shown = ", ".join(repr(k) for k in seen_keys[:12]) + (", ..." if len(seen_keys) > 12 else "")
    lost = [c for c in fields if c not in _TURN_KEYS and c not in found]
    if lost:
        src, rec = fields[lost[0]], objects[0]
        reason = _map_record(rec.value, {lost[0]: src}, None)[1].get(lost[0]) or f"records have keys [{shown}]"
        n = len(objects)
        raise DataError(f"field {src!r} not found (in none of the {n} record{'' if n == 1 else 's'} looked at): "
                        f"{reason}", path=rec.file or path, line=rec.line, index=rec.index)
    mapped = f" (after field mapping {dict(fields)})" if fields else ""
    answerless = _no_response_hint([r.value for r in objects[:20]])
    if answerless:
        raise DataError(f"cannot detect the data format{mapped}: records have keys [{shown}] {answerless}", path=path)
    raise DataError(f"cannot detect the data format{mapped}: records have keys [{shown}]; expected "
                    f"{_FORMAT_HELP}; {_mapping_hint([r.value for r in objects[:20]])}", path=path)


# ---- hints: which fields look like prompts and responses

_PROMPT_LIKE = ("question", "query", "problem", "instruction", "prompt", "input", "context", "source",
                "request", "turns", "human", "user", "q")
_ANSWER_LIKE = ("answer", "response", "output", "solution", "completion", "target", "label", "reply",
                "chosen", "assistant", "gpt", "a")
# names of fields that are never text to train on, whatever they hold
_NOT_TEXT = re.compile(r"(.*_)?(id|ids|idx|uuid|index|hash|key)|category|categories|name|title|type|tags?|"
                       r"lang|language|url|license|split|dataset|model|difficulty|domain|level|subject|topic|"
                       r"(is|has|num|n)_\w+", re.I)
_SLUG = re.compile(r"[\w.:/#@+\-]{0,40}", re.ASCII)  # seed_task_0, writing, 42, en-US: labels, not prose


def _name_role(name: str) -> tuple[str | None, int]:
    words = re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower())
    for role, vocab in (("answer", _ANSWER_LIKE), ("prompt", _PROMPT_LIKE)):
        hits = [vocab.index(w) for w in words if w in vocab]
        if hits:
            return role, min(hits)
    return None, 0


def _text_fields(objects: list[dict]) -> list[dict]:
    """String fields of the sampled records, one level deep (``a.b``, ``a[*].b``, lists of strings),
    with the role their name suggests; ids, names, categories, flags and numbers are left out."""
    seen: dict[str, dict] = {}

    def add(path: str, key: str, value: str, is_list: bool = False) -> None:
        if _NOT_TEXT.fullmatch(key):
            return
        f = seen.setdefault(path, {"path": path, "key": key, "list": is_list, "values": []})
        f["values"].append(value)

    for obj in objects:
        for k, v in obj.items():
            k = str(k)
            if isinstance(v, str):
                add(k, k, v)
            elif isinstance(v, dict):
                for k2, v2 in v.items():
                    if isinstance(v2, str):
                        add(_path_str([k, str(k2)]), str(k2), v2)
            elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                add(k, k, v[0], is_list=True)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for x in v:
                    for k2, v2 in x.items():
                        if isinstance(v2, str):
                            add(_path_str([k, "*", str(k2)]), str(k2), v2)
    out = []
    for f in seen.values():
        f["role"], f["rank"] = _name_role(f["key"])
        texts = [v for v in f["values"] if v.strip()]
        f["prose"] = bool(texts) and 2 * sum(not _SLUG.fullmatch(v.strip()) for v in texts) > len(texts)
        if f["role"] or f["prose"]:
            out.append(f)
    return out


def _pick_roles(objects: list[dict]) -> tuple[dict | None, dict | None, dict | None, list[dict]]:
    """(prompt field, response field, alpaca input field, the fields that fit neither) of the sample."""
    fields = _text_fields(objects)

    def prefix(f):
        return f["path"].split("[*]")[0] if "[*]" in f["path"] else None

    def best(role, compatible=None):
        cands = [f for f in fields if f["role"] == role and (compatible is None or prefix(f) in (None, compatible))]
        return min(cands, key=lambda f: f["rank"]) if cands else None

    answer = best("answer")
    prompt = best("prompt", prefix(answer) if answer else None)
    unknown = [f for f in fields if f["role"] is None and f["prose"] and f is not answer and f is not prompt]
    if prompt is None and unknown:
        prompt = unknown.pop(0)
    extra = None
    if prompt is not None and not prompt["list"]:
        extra = next((f for f in fields if f["role"] == "prompt" and f is not prompt and not f["list"]
                      and f["key"].lower() == "input" and prefix(f) in (None, prefix(answer) if answer else None)),
                     None)
    return prompt, answer, extra, unknown


def _no_response_hint(objects: list[dict]) -> str | None:
    """The sentence saying a file has prompts but nothing to train on as a response, or None."""
    prompt, answer, _, unknown = _pick_roles(objects)
    if prompt is None or answer is not None or unknown:
        return None
    what = (f"{prompt['path']!r} (a list of prompts per record)" if prompt["list"]
            else f"{prompt['path']!r}")
    return (f"and no answers or responses to train on: {what} holds the prompts, but no field holds the "
            f"responses to them (an evaluation set of questions?); SFT trains on a response per record: add "
            f"the responses (e.g. generate them with a model) or use a file that has them")


def _mapping_hint(objects: list[dict]) -> str:
    prompt, answer, extra, unknown = _pick_roles(objects)
    if answer is None and unknown:
        answer = unknown.pop(0)
    p = "PROMPT_FIELD" if prompt is None else prompt["path"] + ("[0]" if prompt["list"] else "")
    a = "RESPONSE_FIELD" if answer is None else answer["path"] + ("[0]" if answer["list"] else "")
    inp = f",input={extra['path']}" if extra is not None else ""
    star = next((f["path"].split("[*]")[0] for f in (prompt, answer, extra) if f and "[*]" in f["path"]), None)
    per = f"; [*] takes one example per element of {star!r}" if star else ""
    return (f"map the fields onto a format, e.g. --fields instruction={p}{inp},output={a} (the Alpaca "
            f"template) or --format prompt_completion --fields prompt={p},completion={a} "
            f"(YAML: data.fields / data.format; formats: {', '.join(FORMATS)}){per}")


# ------------------------------------------------------------------------------------------------
# Validation -> canonical examples


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _check_unicode(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(f"{what} is not valid Unicode (lone surrogate)") from None


def _absent(key: str, label: str, missing: Mapping[str, str] | None) -> RecordError:
    if missing and key in missing:  # a path: say where it stopped
        return RecordError(f"field {label!r} not found: {missing[key]}")
    return RecordError(f"field {label!r} is missing")


def _get_str(r: dict, key: str, label: str, *, optional: bool = False, allow_empty: bool = False,
             missing: Mapping[str, str] | None = None) -> str:
    if key not in r or (optional and r[key] is None):
        if optional:
            return ""
        raise _absent(key, label, missing)
    v = r[key]
    if not isinstance(v, str):
        raise RecordError(f"field {label!r} must be a string, got {_json_type(v)}")
    if not allow_empty and not v.strip():
        raise RecordError(f"field {label!r} is empty")
    _check_unicode(v, f"field {label!r}")
    return v


def _turns(r: dict, fmt: str, fields: Mapping[str, str], element: int | None = None,
           missing: Mapping[str, str] | None = None) -> list[dict]:
    list_key = "conversations" if fmt == "sharegpt" else "messages"
    role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    list_label = _concrete(fields.get(list_key, list_key), element)
    role_label = fields.get(role_key, role_key)
    content_label = fields.get(content_key, content_key)
    roles = SHAREGPT_ROLES if fmt == "sharegpt" else MESSAGES_ROLES
    if list_key not in r:
        raise _absent(list_key, list_label, missing)
    turns = r[list_key]
    if not isinstance(turns, list):
        raise RecordError(f"field {list_label!r} must be a list, got {_json_type(turns)}")
    if not turns:
        raise RecordError(f"field {list_label!r} is empty")
    out = []
    for i, t in enumerate(turns):
        where = f"{list_label}[{i}]"
        if not isinstance(t, dict):
            raise RecordError(f"{where} must be an object, got {_json_type(t)}")
        if role_label not in t:
            raise RecordError(f"{where}: field {role_label!r} is missing")
        role = t[role_label]
        if not isinstance(role, str):
            raise RecordError(f"{where}: field {role_label!r} must be a string, got {_json_type(role)}")
        canon_role = roles.get(role.strip().lower())
        if canon_role is None:
            raise RecordError(f"{where}: unknown role {role!r} (expected one of {', '.join(roles)})")
        if content_label not in t:
            raise RecordError(f"{where}: field {content_label!r} is missing")
        content = t[content_label]
        if not isinstance(content, str):
            raise RecordError(f"{where}: field {content_label!r} must be a string, got {_json_type(content)}")
        _check_unicode(content, f"{where}: field {content_label!r}")
        train = canon_role == "assistant"
        if train:
            if not content.strip():
                raise RecordError(f"{where}: assistant {content_label!r} is empty")
            if fmt == "messages" and "weight" in t:  # OpenAI fine-tuning files: weight 0 = not trained
                w = t["weight"]
                if isinstance(w, bool) or w not in (0, 1):
                    raise RecordError(f"{where}: field 'weight' must be 0 or 1, got {w!r}")
                train = w == 1
        out.append({"role": canon_role, "content": content, "train": train})
    if not any(t["role"] == "assistant" for t in out):
        raise RecordError("conversation has no assistant turn (nothing to train on)")
    if not any(t["train"] for t in out):
        raise RecordError("every assistant turn has weight 0 (nothing to train on)")
    return out


def normalize(record: Any, fmt: str, fields: Mapping[str, str] | None = None,
              element: int | None = None) -> dict:
    """Validate one record against `fmt` and return its canonical example; RecordError if bad. With a
    mapping that explodes a list ([*]), `element` picks the element (see `record_elements`)."""
    fields = fields or {}
    if not isinstance(record, dict):
        raise RecordError(f"record is not a JSON object (got {_json_type(record)})")
    if element is None and fields and _explode_prefix(fields) is not None:
        raise RecordError(f"the field mapping takes one example per element of "
                          f"{_path_str(_explode_prefix(fields))!r}; say which (element=)")
    r, missing = _map_record(record, fields, element) if fields else (record, {})

    def label(k: str) -> str:
        return _concrete(fields.get(k, k), element)

    try:
        if fmt == "alpaca":
            return {"instruction": _get_str(r, "instruction", label("instruction"), missing=missing),
                    "input": _get_str(r, "input", label("input"), optional=True, allow_empty=True),
                    "output": _get_str(r, "output", label("output"), missing=missing)}
        if fmt == "prompt_completion":
            return {"prompt": _get_str(r, "prompt", label("prompt"), missing=missing),
                    "completion": _get_str(r, "completion", label("completion"), missing=missing)}
        if fmt in ("sharegpt", "messages"):
            return {"messages": _turns(r, fmt, fields, element, missing)}
        if fmt == "text":
            return {"text": _get_str(r, "text", label("text"), missing=missing)}
    except RecordError as e:
        other = detect_format(r)
        if other is not None and other != fmt:
            raise RecordError(f"{e.reason} (the record looks like {other!r} but the file's format "
                              f"is {fmt!r})") from None
        raise
    raise RecordError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
