"""From record files to token stores: `build_dataset` and `encode_record`.

    specs -> read (formats.iter_records, streamed) -> detect format / map fields -> validate every record
          -> render (templates) -> tokenize in batches -> labels from character spans
          -> BOS, truncation -> TokenStore per dataset -> eval split -> weighted mixture

Every record of every file is validated before anything is returned, so a bad line stops the run
before training starts (or is skipped and counted with `skip_bad_records=True`).

Label conventions (labels are not shifted; labels[t] is ids[t] or -100):
- prompt/system/user tokens and template scaffolding: -100; response tokens and the EOS or
  end-of-turn token after them: trained;
- position 0 is never trained: no token predicts it (so BOS, when added, is -100, and
  `num_trained_tokens` equals the number of next-token targets).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import DataError, RecordError
from .formats import (FORMATS, RawRecord, apply_fields, check_fields, detect_file_format,
                      detect_format, detection_sample, element_label, field_number, iter_records, normalize,
                      record_elements, records_from_memory)
from .store import IGNORE_INDEX, TokenStore
from .templates import TRAIN_ON, Rendered, render_example
from .tokenizer import Tokenizer, load_tokenizer

_ENCODE_BATCH = 512    # texts per tokenizer call: large enough to amortise the Rust call
_CHUNK_RECORDS = 4096  # source records encoded together (one task of the worker pool)
_BAD_EXAMPLES = 5      # bad-record messages kept per file in the report


@dataclass
class DatasetSpec:
    """One dataset: a source (`path`: a JSON/JSONL/Parquet/Arrow file, a `datasets` save_to_disk
    directory or a Hub dataset id in the local cache, see formats.py) or in-memory `records`.

    format: "auto" (detected per file) or one of FORMATS. fields: canonical -> source field
    mapping applied before detection, e.g. {"prompt": "question", "completion": "answer"}; sources
    may be paths into records, and `[*]` takes one example per element of a list (formats.py).
    weight: the dataset contributes round(weight * len) records to the training mixture."""
    path: str | Path | None = None
    format: str = "auto"
    fields: dict[str, str] | None = None
    weight: float = 1.0
    records: list[Any] | None = None
    name: str | None = None

    def __post_init__(self):
        if (self.path is None) == (self.records is None):
            raise ValueError("DatasetSpec needs exactly one of path= or records=")
        if self.format not in FORMATS + ("auto",):
            raise ValueError(f"{self.display_name}: unknown format {self.format!r} "
                             f"(expected auto or one of {', '.join(FORMATS)})")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{self.display_name}: weight must be a finite number >= 0, got {w!r}")
        self.fields = check_fields(self.fields, where=self.display_name) or None

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        return str(self.path) if self.path is not None else "records"

    @classmethod
    def coerce(cls, spec: Any) -> "DatasetSpec":
        if isinstance(spec, DatasetSpec):
            return spec
        if isinstance(spec, (str, Path)):
            return cls(path=spec)
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise TypeError(f"expected a DatasetSpec, path or dict, got {type(spec).__name__}")


@dataclass
class DatasetBundle:
    train: TokenStore
    eval: TokenStore | None
    report: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Tokenizing rendered examples


def _check_add_bos(add_bos: Any) -> None:
    if add_bos not in ("auto", True, False):
        raise ValueError(f"add_bos must be 'auto', True or False, got {add_bos!r}")


def _piece_labels(ids: list[int], offsets: list[tuple[int, int]], text_len: int,
                  spans: list[tuple[int, int]]) -> list[int]:
    if not spans:
        return [IGNORE_INDEX] * len(ids)
    if spans == [(0, text_len)]:
        return list(ids)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s, e = off[:, 0], off[:, 1]
    trained = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        # a token is trained when its characters overlap the span (a zero-width token: lies in it)
        trained |= ((s < b) & (e > a)) | ((s == e) & (s >= a) & (s < b))
    return np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def tokenize_rendered(rendered: Sequence[Rendered], tokenizer: Tokenizer,
                      add_bos: Any = "auto") -> list[tuple[list[int], list[int]]]:
    """(ids, labels) for each rendered example; one batched tokenizer call per chunk of texts."""
    _check_add_bos(add_bos)
    texts = [text for r in rendered for text, _ in r.pieces]
    # offsets only for pieces partly trained: a piece all prompt or all response labels without them
    partial = [bool(spans) and spans != [(0, len(text))] for r in rendered for text, spans in r.pieces]
    encoded: list = []
    for k in range(0, len(texts), _ENCODE_BATCH):
        encoded.extend(tokenizer.encode_batch(texts[k:k + _ENCODE_BATCH], offsets=partial[k:k + _ENCODE_BATCH]))
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if add_bos is True and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    out = []
    it = iter(encoded)
    for r in rendered:
        ids: list[int] = []
        labels: list[int] = []
        for text, spans in r.pieces:
            p_ids, p_offs = next(it)
            ids.extend(p_ids)
            labels.extend(_piece_labels(p_ids, p_offs, len(text), spans))
        if r.append_eos and eos is not None:
            ids.append(eos)
            labels.append(eos)
        if add_bos is True or (add_bos == "auto" and bos is not None and (not ids or ids[0] != bos)):
            ids.insert(0, bos)
            labels.insert(0, IGNORE_INDEX)
        if labels:
            labels[0] = IGNORE_INDEX  # nothing predicts the first token
        out.append((ids, labels))
    return out


def _resolve_format(record: Any, fmt: str, fields: Mapping[str, str]) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
        return fmt
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    detected = detect_format(apply_fields(record, fields))
    if detected is None:
        raise RecordError(f"cannot detect the data format from keys {sorted(record)}; "
                          f"pass a format and/or a field mapping")
    return detected


def encode_record(record: dict, fmt: str, tokenizer: Tokenizer, *, train_on: str = "all",
                  add_bos: Any = "auto", fields: Mapping[str, str] | None = None
                  ) -> tuple[list[int], list[int]]:
    """Encode one record (no truncation). `fmt` may be "auto". Raises RecordError (reason only)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    fields = check_fields(fields)
    tokenizer = load_tokenizer(tokenizer)
    fmt = _resolve_format(record, fmt, fields)
    example = normalize(record, fmt, fields)
    rendered = render_example(example, fmt, tokenizer, train_on)
    try:
        (ids, labels), = tokenize_rendered([rendered], tokenizer, add_bos)
    except (ValueError, TypeError) as e:
        raise RecordError(f"tokenizer failed: {e}") from None
    if not any(l != IGNORE_INDEX for l in labels):
        raise RecordError("record has no trained tokens")
    return ids, labels


# ------------------------------------------------------------------------------------------------
# One dataset


class _BadRecords:
    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, err: RecordError, raw: RawRecord, path: str) -> None:
        # a directory or Hub id stands for several files: name the record's own; and its list element
        located = err.within(raw.part).at(raw.file or path, line=raw.line, index=raw.index)
        if not self.skip:
            raise located from None
        self.count += 1
        if len(self.examples) < _BAD_EXAMPLES:
            self.examples.append(str(located))


@dataclass
class _Job:
    """What encoding a chunk of one dataset's records needs (inherited by forked workers)."""
    fmt: str
    fields: Mapping[str, str]
    tokenizer: Tokenizer
    train_on: str
    add_bos: Any
    score_field: str | None
    max_seq_len: int
    path: str
    skip: bool


@dataclass
class _Chunk:
    """One chunk's records as numpy, its counts, and the first bad record when bad records stop the run."""
    ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    n_read: int = 0
    n_source: int = 0
    bad_count: int = 0
    bad_examples: list = field(default_factory=list)
    dropped: int = 0
    truncated: int = 0
    cut_tokens: int = 0
    cut_trained: int = 0
    error: DataError | None = None


def _encode_chunk(raws: Sequence[RawRecord], job: _Job) -> _Chunk:
    """Validate, render, tokenise, label and truncate one chunk of records (in order: the first bad record
    of the chunk is the one reported)."""
    out = _Chunk()
    bad = _BadRecords(job.skip)
    try:
        _encode_into(raws, job, bad, out)
    except DataError as e:
        out.error = e
    out.bad_count, out.bad_examples = bad.count, bad.examples
    return out


def _encode_into(raws, job: _Job, bad: _BadRecords, out: _Chunk) -> None:
    fields, path = job.fields, job.path
    rendered: list[Rendered] = []
    kept_raws: list[RawRecord] = []
    scores: list[float] = []  # with score_field: each kept record's number, in step with kept_raws
    for raw in raws:
        out.n_source += 1
        try:
            if raw.error is not None:
                raise raw.error
            elements = record_elements(raw.value, fields)  # [None], or one per element of a [*] list
        except RecordError as e:
            out.n_read += 1
            bad(e, raw, path)
            continue
        out.n_read += len(elements)
        for element in elements:
            at = RawRecord(None, line=raw.line, index=raw.index, file=raw.file,
                           part=element_label(fields, element))
            try:
                example = normalize(raw.value, job.fmt, fields, element=element)
                if job.score_field is not None:
                    score = field_number(raw.value, job.score_field, element, role="the curriculum's score")
                rendered.append(render_example(example, job.fmt, job.tokenizer, job.train_on))
                kept_raws.append(at)
                if job.score_field is not None:
                    scores.append(score)
            except RecordError as e:
                bad(e, at, path)

    try:
        encoded = tokenize_rendered(rendered, job.tokenizer, job.add_bos)
    except Exception:
        # find the culprit record so the error can name it
        encoded = []
        good = []
        for i, (r, raw) in enumerate(zip(rendered, kept_raws)):
            try:
                encoded.extend(tokenize_rendered([r], job.tokenizer, job.add_bos))
                good.append(i)
            except Exception as e:
                bad(RecordError(f"tokenizer failed: {type(e).__name__}: {e}"), raw, path)
        kept_raws = [kept_raws[i] for i in good]
        scores = [scores[i] for i in good] if job.score_field is not None else scores
    del rendered

    max_seq_len = job.max_seq_len
    for k, ((ids, labels), raw) in enumerate(zip(encoded, kept_raws)):
        if labels.count(IGNORE_INDEX) == len(labels):
            bad(RecordError("record has no trained tokens"), raw, path)
            continue
        if len(ids) > max_seq_len:
            rest = labels[max_seq_len:]
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if labels.count(IGNORE_INDEX) == len(labels):
                out.dropped += 1
                continue
            out.truncated += 1
            out.cut_tokens += len(rest)
            out.cut_trained += len(rest) - rest.count(IGNORE_INDEX)
        out.ids.append(np.asarray(ids, dtype=np.int32))
        out.labels.append(np.asarray(labels, dtype=np.int32))
        if job.score_field is not None:
            out.scores.append(scores[k])


def _chunks(raws, size: int):
    chunk = []
    for raw in raws:
        chunk.append(raw)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_JOB: _Job | None = None  # set in the parent just before the fork; workers read their copy


def _worker_chunk(raws):
    return _encode_chunk(raws, _WORKER_JOB)


def _worker_init():
    """A worker leaves signals to its parent: the trainer's SIGTERM/SIGINT handlers (checkpoint, then stop)
    are inherited through the fork and would keep the pool's terminate() from ending it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encoded_chunks(raws, job: _Job, workers: int):
    """``_encode_chunk`` of every chunk, in order: in this process, or -- from the second chunk on, when
    ``workers`` > 1 -- in a pool of forked processes with a few chunks in flight (reading stays streamed)."""
    global _WORKER_JOB
    chunks = _chunks(raws, _CHUNK_RECORDS)
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    context = _fork_context() if workers > 1 and second is not None else None
    if context is None:
        for chunk in itertools.chain([first], [] if second is None else [second], chunks):
            yield _encode_chunk(chunk, job)
        return
    import collections
    import os

    _WORKER_JOB = job
    # forked workers would inherit the fast tokenizer's thread pool: tell it not to use one (it warns else)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer=_worker_init)
    finally:
        _WORKER_JOB = None
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        pending = collections.deque()
        for chunk in itertools.chain([first, second], chunks):
            pending.append(pool.apply_async(_worker_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def _fork_context():
    """multiprocessing's fork context where the platform has it (Linux), else None (then no pool)."""
    import multiprocessing
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return multiprocessing.get_context("fork")
    except ValueError:
        return None


def default_workers() -> int:
    """Processes for tokenising: the cores this process may use."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def load_dataset(spec: DatasetSpec, tokenizer: Tokenizer, *, max_seq_len: int, train_on: str = "all",
                 add_bos: Any = "auto", skip_bad_records: bool = False, source: int = 0,
                 name: str | None = None, score_field: str | None = None,
                 workers: int | None = None) -> tuple[TokenStore, dict]:
    """Read, validate and encode one dataset into a TokenStore (all records, before any split or
    mixing) plus its report entry. ``score_field``: a field path whose number each record must have,
    kept as the store's ``score`` (the curriculum's ``field:NAME``).

    Records are read streamed and encoded in chunks of ``_CHUNK_RECORDS``, each turned into numpy arrays
    at once (memory: the token store plus a few chunks, not every record as Python objects); from the second
    chunk on in ``workers`` forked processes (None: the cores; 1: this process only). The result does not
    depend on ``workers``."""
    name = name or spec.display_name
    path = str(spec.path) if spec.path is not None else name
    fields = spec.fields or {}
    if spec.records is not None:
        if not isinstance(spec.records, (list, tuple)):
            raise DataError(f"records must be a list, got {type(spec.records).__name__}", path=path)
        raws = iter(records_from_memory(spec.records))
        if not spec.records:
            raise DataError("no records", path=path)
    else:
        raws = iter_records(spec.path)  # streamed: Parquet/Arrow a batch of rows at a time

    detected = spec.format == "auto"
    head = detection_sample(raws, fields) if detected else []
    fmt = detect_file_format(head, fields, path) if detected else spec.format
    job = _Job(fmt=fmt, fields=fields, tokenizer=tokenizer, train_on=train_on, add_bos=add_bos,
               score_field=score_field, max_seq_len=max_seq_len, path=path, skip=skip_bad_records)

    ids, labels, scores = [], [], []
    total = _Chunk()
    for chunk in _encoded_chunks(itertools.chain(head, raws), job, default_workers() if workers is None else workers):
        if chunk.error is not None:
            raise chunk.error
        ids += chunk.ids
        labels += chunk.labels
        scores += chunk.scores
        for key in ("n_read", "n_source", "bad_count", "dropped", "truncated", "cut_tokens", "cut_trained"):
            setattr(total, key, getattr(total, key) + getattr(chunk, key))
        total.bad_examples += chunk.bad_examples[:_BAD_EXAMPLES - len(total.bad_examples)]
    del head
    kept, dropped = len(ids), total.dropped
    if dropped and kept <= 0.01 * (kept + dropped):  # "almost none": training on a handful is an error
        raise DataError(f"only {kept} of {kept + dropped} records are left: {dropped} lose every trained "
                        f"token when truncated to max_seq_len={max_seq_len}; raise data.max_seq_len", path=path)

    if not kept:
        if total.bad_count:
            raise DataError(f"no usable records: all {total.bad_count} of {total.n_read} records are bad "
                            f"(first: {total.bad_examples[0]})", path=path)
        raise DataError(f"no usable records: all {dropped} records lose every trained token when "
                        f"truncated to max_seq_len={max_seq_len}", path=path)
    store = TokenStore.from_records(zip(ids, labels), source=source, names=None,
                                    score=scores if score_field is not None else None)
    report = {
        "name": name,
        "path": None if spec.path is None else str(spec.path),
        "format": fmt,
        "format_detected": detected,
        "fields": dict(fields) or None,
        "weight": spec.weight,
        "records_read": total.n_read,
        "source_records": total.n_source,  # records in the source (records_read counts [*] elements apart)
        "bad_skipped": total.bad_count,
        "bad_examples": total.bad_examples,
        "dropped_truncated": dropped,
        "truncated": total.truncated,
        "truncated_tokens": total.cut_tokens,
        "truncated_trained_tokens": total.cut_trained,
        "records": len(store),
        "tokens": store.num_tokens,
        "trained_tokens": store.num_trained_tokens,
    }
    return store, report


# ------------------------------------------------------------------------------------------------
# Splits and mixtures


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # one independent stream per (purpose, dataset): adding a dataset leaves the others' draws alone
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


def split_eval(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, eval_idx), both sorted. At least one record is held out when fraction > 0 and
    n >= 2; at least one stays in train."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.zeros(0, np.int64)
    n_eval = min(max(1, int(math.floor(fraction * n + 0.5))), n - 1)
    perm = rng.permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def mixture_indices(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """round(weight * n) record indices: whole copies of 0..n-1, then a sample without replacement
    of the remainder (sorted)."""
    count = int(math.floor(weight * n + 0.5))
    if n == 0 or count == 0:
        return np.zeros(0, np.int64)
    copies, rest = divmod(count, n)
    parts = [np.arange(n)] * copies
    if rest:
        parts.append(np.sort(rng.choice(n, size=rest, replace=False)))
    return np.concatenate(parts)


def replay_indices(trained_tokens: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Record indices whose trained tokens add up to about ``target``: whole copies of every record while
    they fit, then a seeded random order of the records, cut where the running total comes closest."""
    total = int(trained_tokens.sum())
    if total == 0 or target <= 0:
        return np.zeros(0, np.int64)
    copies, rest = divmod(float(target), total)
    parts = [np.arange(len(trained_tokens))] * int(copies)
    order = rng.permutation(len(trained_tokens))
    prefix_sums = np.concatenate([[0], np.cumsum(trained_tokens[order])])
    k = int(np.argmin(np.abs(prefix_sums - rest)))  # the prefix closest to the rest (the shorter on a tie)
    parts.append(np.sort(order[:k]))
    return np.concatenate(parts)


def _fractions(values: dict[str, int]) -> dict[str, float]:
    total = sum(values.values())
    return {k: (v / total if total else 0.0) for k, v in values.items()}


def _unique_names(specs: Sequence[DatasetSpec], taken: set[str]) -> list[str]:
    out = []
    for s in specs:
        base = s.display_name
        nm, k = base, 2
        while nm in taken:
            nm, k = f"{base}#{k}", k + 1
        taken.add(nm)
        out.append(nm)
    return out


def _summary(store: TokenStore) -> dict:
    return {"records": len(store), "tokens": store.num_tokens,
            "trained_tokens": store.num_trained_tokens}


def build_dataset(specs: Sequence[Any], tokenizer: Any, *, max_seq_len: int, train_on: str = "all",
                  add_bos: Any = "auto", skip_bad_records: bool = False, eval_fraction: float = 0.0,
                  eval_specs: Sequence[Any] | None = None, seed: int = 0, replay: Any = None,
                  replay_share: float = 0.0, score_field: str | None = None,
                  workers: int | None = None) -> DatasetBundle:
    """Read, validate, encode, split and mix datasets.

    specs: DatasetSpec, paths, or dicts of DatasetSpec fields. tokenizer: a Tokenizer or anything
    `load_tokenizer` takes. Records longer than max_seq_len keep their start; those left with no
    trained token are dropped (counted). eval_fraction: held out from each dataset before mixing
    (seeded); or eval_specs: separate eval datasets (weights ignored). The train store is
    shuffled (seeded). See `DatasetBundle.report` for counts and realised mixture proportions.

    replay: a dataset of pretraining-style text (format "text": every token trained) mixed in so that it
    makes ``replay_share`` of the trained tokens (against forgetting); never split off for eval. The
    report's ``replay`` says the share asked for and the share realised.

    score_field: a field path every training record must hold a number at (``data.curriculum:
    field:NAME``); the train store's ``score`` keeps it (NaN for replay records, which have none).

    workers: processes that encode (see `load_dataset`); None: the cores."""
    if isinstance(specs, (str, Path, DatasetSpec, Mapping)):
        specs = [specs]
    specs = [DatasetSpec.coerce(s) for s in specs]
    if not specs:
        raise ValueError("build_dataset: no datasets given")
    eval_specs = [DatasetSpec.coerce(s) for s in
                  ([eval_specs] if isinstance(eval_specs, (str, Path, DatasetSpec, Mapping))
                   else (eval_specs or []))]
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    _check_add_bos(add_bos)
    if not (isinstance(eval_fraction, (int, float)) and 0.0 <= eval_fraction < 1.0):
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    if eval_fraction > 0 and eval_specs:
        raise ValueError("give either eval_fraction or eval_specs, not both")
    tokenizer = load_tokenizer(tokenizer)
    kw = dict(max_seq_len=int(max_seq_len), train_on=train_on, add_bos=add_bos,
              skip_bad_records=skip_bad_records, workers=workers)

    taken: set[str] = set()
    names = _unique_names(specs, taken)
    eval_names = _unique_names(eval_specs, taken)
    if len(names) > np.iinfo(np.int16).max or len(eval_names) > np.iinfo(np.int16).max:
        raise ValueError("too many datasets (source ids are int16)")

    # read, validate and encode everything first (train and eval files alike)
    loaded = [load_dataset(s, tokenizer, source=i, name=nm, score_field=score_field, **kw)
              for i, (s, nm) in enumerate(zip(specs, names))]
    loaded_eval = [load_dataset(s, tokenizer, source=i, name=nm, **kw)
                   for i, (s, nm) in enumerate(zip(eval_specs, eval_names))]

    train_parts, eval_parts, reports = [], [], []
    for i, ((store, rep), spec) in enumerate(zip(loaded, specs)):
        store.names = names
        train_idx, eval_idx = split_eval(len(store), eval_fraction, _rng(seed, 1, i))
        if len(eval_idx):
            eval_parts.append(store.select(eval_idx))
        pool = store.select(train_idx) if len(eval_idx) else store
        part = pool.select(mixture_indices(len(pool), spec.weight, _rng(seed, 2, i)))
        train_parts.append(part)
        rep.update(eval_records=int(len(eval_idx)), train_pool_records=len(pool),
                   train_records=len(part), train_trained_tokens=part.num_trained_tokens)
        reports.append(rep)

    replay_report = None
    if replay is not None:
        if not 0.0 < replay_share < 1.0:
            raise ValueError(f"replay_share must be in (0, 1), got {replay_share!r}")
        spec = DatasetSpec.coerce(replay)
        (name,) = _unique_names([spec], taken)
        names = names + [f"replay:{name}"]
        store, rep = load_dataset(spec, tokenizer, source=len(names) - 1, name=names[-1], **kw)
        store.names = names
        instruction = sum(part.num_trained_tokens for part in train_parts)
        target = replay_share / (1.0 - replay_share) * instruction
        part = store.select(replay_indices(store.trained_per_record(), target, _rng(seed, 4)))
        train_parts.append(part)
        rep.update(eval_records=0, train_pool_records=len(store), train_records=len(part),
                   train_trained_tokens=part.num_trained_tokens)
        reports.append(rep)
        realised = part.num_trained_tokens / max(instruction + part.num_trained_tokens, 1)
        replay_report = {"name": names[-1], "share": replay_share, "realised_share": realised,
                         "trained_tokens": part.num_trained_tokens}

    train = TokenStore.concat(train_parts)
    train.names = names
    if len(train) == 0:
        raise DataError("no training records after mixing (every weight is 0?)",
                        path=", ".join(names))
    train = train.select(_rng(seed, 3).permutation(len(train)))

    eval_store: TokenStore | None = None
    eval_reports = []
    if loaded_eval:
        for store, rep in loaded_eval:
            store.names = eval_names
            eval_reports.append(rep)
        eval_store = TokenStore.concat([s for s, _ in loaded_eval])
        eval_store.names = eval_names
    elif eval_parts:
        eval_store = TokenStore.concat(eval_parts)
        eval_store.names = names

    report = {
        "datasets": reports,
        "eval_datasets": eval_reports,
        "mixture": {
            "records": _fractions({r["name"]: r["train_records"] for r in reports}),
            "trained_tokens": _fractions({r["name"]: r["train_trained_tokens"] for r in reports}),
        },
        "replay": replay_report,
        "train": _summary(train),
        "eval": None if eval_store is None else _summary(eval_store),
        "settings": {"max_seq_len": int(max_seq_len), "train_on": train_on, "add_bos": add_bos,
                     "skip_bad_records": skip_bad_records, "eval_fraction": eval_fraction,
                     "seed": seed, "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__)},
    }
    return DatasetBundle(train=train, eval=eval_store, report=report)
