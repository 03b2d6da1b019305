"""TokenStore: every record of a dataset as flat numpy buffers.

    ids     int32 [T]    token ids of all records, back to back
    labels  int32 [T]    labels[t] == ids[t] where trained, -100 elsewhere (NOT shifted; packing
                         shifts them into next-token targets)
    offsets int64 [N+1]  record i is ids[offsets[i]:offsets[i+1]]
    source  int16 [N]    which dataset record i came from (an index into `names`)
    names   list[str]    dataset names
    score   float64 [N]  optional: a number per record read from the data (``data.curriculum:
                         field:NAME``), NaN for records without one (replay text); None when not asked for

Packing and samplers only read `lengths`/`offsets` and slice the buffers; nothing per record is a
Python object. `select(indices)` builds splits, mixtures and repetitions with one gather.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

IGNORE_INDEX = -100
_FORMAT_VERSION = 1


class TokenStore:
    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 source: np.ndarray | None = None, names: Sequence[str] | None = None,
                 score: np.ndarray | None = None):
        self.ids = np.ascontiguousarray(ids, dtype=np.int32)
        self.labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        n = len(self.offsets) - 1
        self.source = (np.zeros(n, np.int16) if source is None
                       else np.ascontiguousarray(source, dtype=np.int16))
        self.names = list(names) if names is not None else []
        self.score = None if score is None else np.ascontiguousarray(score, dtype=np.float64)
        if self.score is not None and self.score.shape != (max(n, 0),):
            raise ValueError(f"score has shape {self.score.shape}, expected ({n},)")
        if n < 0 or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError("offsets must start at 0 and end at len(ids)")
        if self.ids.shape != self.labels.shape or self.ids.ndim != 1:
            raise ValueError(f"ids {self.ids.shape} and labels {self.labels.shape} must be 1-D and equal")
        if self.source.shape != (n,):
            raise ValueError(f"source has shape {self.source.shape}, expected ({n},)")
        if n and np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(cls, names: Sequence[str] | None = None) -> "TokenStore":
        z = np.zeros(0, np.int32)
        return cls(z, z, np.zeros(1, np.int64), np.zeros(0, np.int16), names)

    @classmethod
    def from_records(cls, records: Iterable[tuple[Sequence[int], Sequence[int]]],
                     source: int | Sequence[int] = 0, names: Sequence[str] | None = None,
                     score: Sequence[float] | None = None) -> "TokenStore":
        """Build from (ids, labels) pairs (lists or arrays); ``score``: one number per record, or None."""
        id_parts, label_parts, lengths = [], [], []
        for ids, labels in records:
            if len(ids) != len(labels):
                raise ValueError(f"record {len(lengths)}: {len(ids)} ids but {len(labels)} labels")
            id_parts.append(np.asarray(ids, dtype=np.int32))
            label_parts.append(np.asarray(labels, dtype=np.int32))
            lengths.append(len(ids))
        if not lengths:
            store = cls.empty(names)
            store.score = None if score is None else np.zeros(0)
            return store
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        src = np.broadcast_to(np.asarray(source, dtype=np.int16), (len(lengths),))
        return cls(np.concatenate(id_parts), np.concatenate(label_parts), offsets, src, names, score)

    # --- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(len(self.ids))

    @property
    def num_trained_tokens(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))

    def trained_per_record(self) -> np.ndarray:
        """int64 [N]: trained tokens of each record."""
        csum = np.concatenate([[0], np.cumsum(self.labels != IGNORE_INDEX, dtype=np.int64)])
        return csum[self.offsets[1:]] - csum[self.offsets[:-1]]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for a store of {n}")
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.labels[a:b]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # --- splitting and combining ----------------------------------------------------------------
    def _gather(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record indices made non-negative, the new offsets, each new token's position in this store)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"select: index out of range for a store of {n}")
        idx = np.where(idx < 0, idx + n, idx)
        starts = self.offsets[idx]
        lens = self.offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        # token t of the output comes from starts[r] + (t - offsets[r]) for its record r
        gather = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)
        return idx, offsets, gather

    def token_positions(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """int64: where each token of ``select(indices)`` sits in this store (for per-token side arrays)."""
        return self._gather(indices)[2]

    def select(self, indices: Sequence[int] | np.ndarray) -> "TokenStore":
        """A new store holding records `indices` in that order (repeats allowed)."""
        idx, offsets, gather = self._gather(indices)
        return TokenStore(self.ids[gather], self.labels[gather], offsets, self.source[idx], self.names,
                          None if self.score is None else self.score[idx])

    @staticmethod
    def concat(stores: Sequence["TokenStore"]) -> "TokenStore":
        """Records of all stores in order. Source ids are remapped onto the union of names."""
        stores = list(stores)
        if not stores:
            return TokenStore.empty()
        names: list[str] = []
        sources = []
        for s in stores:
            if s.names:
                remap = []
                for nm in s.names:
                    if nm not in names:
                        names.append(nm)
                    remap.append(names.index(nm))
                remap_arr = np.asarray(remap, dtype=np.int16)
                src = remap_arr[s.source] if len(s) else s.source
            else:
                src = s.source
            sources.append(src)
        score = None
        if any(s.score is not None for s in stores):  # a store without scores gives NaN (no score)
            score = np.concatenate([s.score if s.score is not None else np.full(len(s), np.nan) for s in stores])
        lens = np.concatenate([s.lengths for s in stores])
        offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        return TokenStore(np.concatenate([s.ids for s in stores]),
                          np.concatenate([s.labels for s in stores]), offsets,
                          np.concatenate(sources), names, score)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write an .npz (uncompressed; atomic via rename). Returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, ids=self.ids, labels=self.labels, offsets=self.offsets, source=self.source,
                         names=np.asarray(self.names, dtype=np.str_).reshape(-1),
                         version=np.asarray(_FORMAT_VERSION),
                         **({} if self.score is None else {"score": self.score}))
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old store or the new
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TokenStore":
        path = Path(path)
        if not path.exists() and path.with_name(path.name + ".npz").exists():
            path = path.with_name(path.name + ".npz")
        with np.load(path, allow_pickle=False) as z:
            version = int(z["version"]) if "version" in z else _FORMAT_VERSION
            if version != _FORMAT_VERSION:
                raise ValueError(f"{path}: token store format version {version}, expected {_FORMAT_VERSION}")
            names = [str(x) for x in z["names"]] if "names" in z else None
            return cls(z["ids"], z["labels"], z["offsets"], z["source"], names,
                       z["score"] if "score" in z else None)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenStore):
            return NotImplemented
        return (np.array_equal(self.ids, other.ids) and np.array_equal(self.labels, other.labels)
                and np.array_equal(self.offsets, other.offsets)
                and np.array_equal(self.source, other.source) and self.names == other.names
                and (self.score is None) == (other.score is None)
                and (self.score is None or np.array_equal(self.score, other.score, equal_nan=True)))

    __hash__ = None  # mutable buffers

    def __repr__(self) -> str:
        return (f"TokenStore(records={len(self)}, tokens={self.num_tokens}, "
                f"trained={self.num_trained_tokens}, names={self.names})")
