"""Reading record files and turning records into canonical examples.

Files are a JSON list of objects or JSONL (one object per line; blank lines are ignored). A file's
format is detected from its records (or given explicitly), after an optional field mapping
canonical_field -> source_field (e.g. ``{"prompt": "question", "completion": "answer"}`` for GSM8K).

Canonical examples (what `normalize` returns; templates.py renders them):
    alpaca             {"instruction": str, "input": str, "output": str}      ("input" may be "")
    prompt_completion  {"prompt": str, "completion": str}
    sharegpt, messages {"messages": [{"role": "system"|"user"|"assistant", "content": str,
                                      "train": bool}, ...]}
    text               {"text": str}
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import DataError, RecordError

FORMATS = ("alpaca", "prompt_completion", "sharegpt", "messages", "text")
# Canonical field names a mapping may target. from/value (sharegpt) and role/content (messages)
# are keys inside each turn.
CANONICAL_FIELDS = ("instruction", "input", "output", "prompt", "completion", "conversations",
                    "messages", "text", "from", "value", "role", "content")
_FORMAT_HELP = ("alpaca (instruction, output[, input]), prompt_completion (prompt, completion), "
                "sharegpt (conversations), messages (messages), text (text)")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_DETECT_SAMPLE = 100  # records looked at to detect a file's format (majority vote)


# ------------------------------------------------------------------------------------------------
# Reading files


@dataclass
class RawRecord:
    """One record as read: `value` is the parsed JSON, or None with `error` set (bad JSON/UTF-8)."""
    value: Any
    line: int | None = None   # 1-based line (JSONL)
    index: int | None = None  # 0-based index (JSON list, in-memory records)
    error: RecordError | None = None

    def where(self, path: str) -> dict:
        return {"path": path, "line": self.line, "index": self.index}


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


def read_records(path: str | Path) -> list[RawRecord]:
    """Parse a JSON-list or JSONL file. File-level problems (missing, unreadable, empty, a JSON
    list that does not parse) raise DataError; per-line problems come back as RawRecord.error."""
    p = Path(path)
    name = str(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file", path=name) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a .json or .jsonl file", path=name) from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path=name) from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    head = data.lstrip()
    if not head:
        raise DataError("file is empty", path=name)

    if head[:1] == b"[":
        records = _read_json_list(data, name, jsonl_fallback=p.suffix.lower() == ".jsonl")
        if records is not None:
            if not records:
                raise DataError("file is empty (a JSON list with no records)", path=name)
            return records
    elif head[:1] == b"{" and data.strip().count(b"\n") > 0:
        # one JSON object pretty-printed over several lines: say so instead of "bad JSON on line 1"
        try:
            whole = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            raise DataError("file holds a single JSON object; expected a JSON list of records or "
                            "one JSON object per line (JSONL)", path=name)
    return _read_jsonl(data)


def _read_json_list(data: bytes, name: str, jsonl_fallback: bool) -> list[RawRecord] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if jsonl_fallback:
            return None
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"invalid UTF-8 (byte offset {e.start})", path=name, line=line) from None
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


def _read_jsonl(data: bytes) -> list[RawRecord]:
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.strip()
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append(RawRecord(None, line=lineno, error=RecordError(
                f"invalid UTF-8 (byte {e.start} of the line)")))
            continue
        try:
            out.append(RawRecord(_json_loads(text), line=lineno))
        except json.JSONDecodeError as e:
            out.append(RawRecord(None, line=lineno, error=RecordError(
                f"invalid JSON: {e.msg} (column {e.colno})")))
        except RecordError as e:
            out.append(RawRecord(None, line=lineno, error=e))
    return out


def records_from_memory(records: Iterable[Any]) -> list[RawRecord]:
    return [RawRecord(v, index=i) for i, v in enumerate(records)]


# ------------------------------------------------------------------------------------------------
# Field mapping and detection


def check_fields(fields: Mapping[str, str] | None, where: str = "fields") -> dict[str, str]:
    """Validate a canonical -> source field mapping."""
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise DataError(f"{where}: field mapping must be a dict canonical -> source, "
                        f"got {type(fields).__name__}")
    out = {}
    for canon, src in fields.items():
        if canon not in CANONICAL_FIELDS:
            raise DataError(f"{where}: unknown canonical field {canon!r} in field mapping "
                            f"(known: {', '.join(CANONICAL_FIELDS)})")
        if not isinstance(src, str) or not src:
            raise DataError(f"{where}: field mapping {canon!r} -> {src!r}: source must be a non-empty string")
        out[canon] = src
    return out


def apply_fields(record: dict, fields: Mapping[str, str]) -> dict:
    """Copy of `record` with canonical keys taken from their mapped source keys (top level only;
    from/value/role/content mappings apply inside turns, see `normalize`)."""
    if not fields:
        return record
    out = dict(record)
    for canon, src in fields.items():
        if canon in ("from", "value", "role", "content"):
            continue
        if src in record:
            out[canon] = record[src]
        else:
            out.pop(canon, None)  # the mapping names the source; a same-named canonical key is not used
    return out


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


_PROMPT_LIKE = ("question", "query", "problem", "instruction", "prompt", "input", "context", "source")
_ANSWER_LIKE = ("answer", "response", "output", "solution", "completion", "target", "label")


def _mapping_hint(keys: list[str]) -> str:
    p = next((k for k in _PROMPT_LIKE if k in keys), None)
    a = next((k for k in _ANSWER_LIKE if k in keys and k != p), None)
    if p is None or a is None:
        rest = [k for k in keys if k not in (p, a)]
        p = p or (rest.pop(0) if rest else "my_prompt_field")
        a = a or (rest.pop(0) if rest else "my_answer_field")
    return (f"map the fields onto a format, e.g. --fields instruction={p},output={a} (the Alpaca "
            f"template) or --format prompt_completion --fields prompt={p},completion={a} "
            f"(YAML: data.fields / data.format; formats: {', '.join(FORMATS)})")


def detect_file_format(raws: list[RawRecord], fields: Mapping[str, str], path: str) -> str:
    """Majority format of the first detectable records; DataError naming the keys seen if none."""
    votes: Counter = Counter()
    first: dict[str, int] = {}
    seen_keys: list[str] = []
    n_objects = 0
    for raw in raws:
        if raw.error is not None or not isinstance(raw.value, dict):
            continue
        n_objects += 1
        if n_objects <= 20:
            seen_keys.extend(k for k in raw.value if k not in seen_keys)
        fmt = detect_format(apply_fields(raw.value, fields))
        if fmt is not None:
            votes[fmt] += 1
            first.setdefault(fmt, len(first))
            if sum(votes.values()) >= _DETECT_SAMPLE:
                break
    if votes:
        return max(votes, key=lambda f: (votes[f], -first[f]))
    if n_objects == 0:
        raise DataError("cannot detect the data format: no record is a JSON object", path=path)
    shown = ", ".join(repr(k) for k in seen_keys[:12]) + (", ..." if len(seen_keys) > 12 else "")
    mapped = f" (after field mapping {dict(fields)})" if fields else ""
    raise DataError(f"cannot detect the data format{mapped}: records have keys [{shown}]; "
                    f"expected {_FORMAT_HELP}; {_mapping_hint(seen_keys)}", path=path)


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


def _get_str(r: dict, key: str, label: str, *, optional: bool = False, allow_empty: bool = False) -> str:
    if key not in r or (optional and r[key] is None):
        if optional:
            return ""
        raise RecordError(f"field {label!r} is missing")
    v = r[key]
    if not isinstance(v, str):
        raise RecordError(f"field {label!r} must be a string, got {_json_type(v)}")
    if not allow_empty and not v.strip():
        raise RecordError(f"field {label!r} is empty")
    _check_unicode(v, f"field {label!r}")
    return v


def _turns(r: dict, fmt: str, fields: Mapping[str, str]) -> list[dict]:
    list_key = "conversations" if fmt == "sharegpt" else "messages"
    role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    list_label = fields.get(list_key, list_key)
    role_label = fields.get(role_key, role_key)
    content_label = fields.get(content_key, content_key)
    roles = SHAREGPT_ROLES if fmt == "sharegpt" else MESSAGES_ROLES
    if list_key not in r:
        raise RecordError(f"field {list_label!r} is missing")
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


def normalize(record: Any, fmt: str, fields: Mapping[str, str] | None = None) -> dict:
    """Validate one record against `fmt` and return its canonical example; RecordError if bad."""
    fields = fields or {}
    if not isinstance(record, dict):
        raise RecordError(f"record is not a JSON object (got {_json_type(record)})")
    r = apply_fields(record, fields)

    def label(k: str) -> str:
        return fields.get(k, k)

    try:
        if fmt == "alpaca":
            return {"instruction": _get_str(r, "instruction", label("instruction")),
                    "input": _get_str(r, "input", label("input"), optional=True, allow_empty=True),
                    "output": _get_str(r, "output", label("output"))}
        if fmt == "prompt_completion":
            return {"prompt": _get_str(r, "prompt", label("prompt")),
                    "completion": _get_str(r, "completion", label("completion"))}
        if fmt in ("sharegpt", "messages"):
            return {"messages": _turns(r, fmt, fields)}
        if fmt == "text":
            return {"text": _get_str(r, "text", label("text"))}
    except RecordError as e:
        other = detect_format(r)
        if other is not None and other != fmt:
            raise RecordError(f"{e.reason} (the record looks like {other!r} but the file's format "
                              f"is {fmt!r})") from None
        raise
    raise RecordError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
