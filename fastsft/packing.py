"""Sequence packing: lengths -> bins of `capacity` tokens, and bins -> model-ready batches.

Two implementations with identical results, bit for bit:

  native   fastsft._packing (csrc/packing.cpp), built by setup.py with pybind11 + numpy buffers
  python   the functions below whose names end in `_py`; the fallback and the test oracle

The backend is chosen once at import; `_override_impl` (None | "native" | "python") lets tests and
benchmarks force one. A missing extension warns once and uses the Python path.

Packing (`pack`)
----------------
1. Overflow. A sequence longer than `capacity` is clipped to `capacity` ("truncate"), cut into pieces
   of `capacity` tokens plus a remainder ("split"), or left out ("drop"); each policy counts the
   sequences it touched. The result is a stream of items (index, start, length), in input order,
   pieces of one sequence in start order.
2. Placement, bins numbered in the order they are opened:
   - "bfd" (best-fit decreasing): items sorted by length, decreasing, stable; each goes into the
     bin with the smallest remaining capacity >= its length, else into a new bin. Open bins live in
     buckets keyed by remaining capacity (LIFO within a bucket, so ties go to the bin that reached
     that capacity last); the set of non-empty buckets is a sorted list (Python, bisect) or a
     64-ary bit tree (C++) over 0..capacity. O(N log capacity) after an O(N + capacity) counting
     sort (C++) / O(N log N) argsort (Python).
   - "first_fit": items in stream order; each goes into the lowest-numbered bin with room, else a
     new bin. A segment tree of max remaining capacity over bins finds it in O(log N).
3. Order. With a seed, bins are shuffled by Fisher-Yates driven by splitmix64 (j = next() % (i+1)
   for i = B-1 .. 1), implemented identically in both paths. Without a seed bins stay in opening
   order. Within a bin, items keep their placement order.

Assembly (`assemble`, `assemble_bins`)
--------------------------------------
Reads the token store's flat buffers (ids int32 [T], labels int32 [T] unshifted, offsets int64
[N+1]) and writes, per item (one attention segment):
  input_ids[t]     = ids of the item's tokens
  targets[t]       = labels of the NEXT token of the same record (record position start+t+1), or
                     -100 at the last token of the record. Targets never cross into another record.
                     A split piece's last token predicts the first token of the record's next piece
                     (a real next token of the same record); a truncated item's last token predicts
                     the first clipped token.
  position_ids[t]  = t - segment start (restart at 0 for each item, pieces included)
  cu_seqlens       = int32 segment boundaries, max_seqlen = longest segment
"""

from __future__ import annotations

import warnings
from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np

from fastsft import kernel_usage

try:
    from fastsft import _packing as _native
except ImportError:  # the extension is optional; see setup.py
    _native = None

IGNORE_INDEX = -100
STRATEGIES = ("bfd", "first_fit")
OVERFLOW = ("truncate", "split", "drop")
# Buckets and the bit tree take O(capacity) memory; 2**26 tokens is far beyond any context length.
MAX_CAPACITY = 1 << 26

_override_impl: str | None = None  # None (auto) | "native" | "python"
_warned_fallback = False

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


@dataclass
class PackResult:
    """Bins over the items of one packing.

    Bin b holds items[bin_offsets[b]:bin_offsets[b+1]] in placement order; item k is tokens
    [item_starts[k], item_starts[k] + item_lengths[k]) of input sequence items[k].
    """

    bin_offsets: np.ndarray   # int64 [B+1]
    items: np.ndarray         # int64 [K] index into the input lengths
    item_starts: np.ndarray   # int64 [K] offset within that sequence (0 unless split)
    item_lengths: np.ndarray  # int64 [K] tokens taken (<= capacity)
    capacity: int
    truncated: int = 0        # sequences clipped to capacity (overflow="truncate")
    split: int = 0            # sequences cut into pieces (overflow="split")
    dropped: int = 0          # sequences left out (overflow="drop")

    @property
    def num_bins(self) -> int:
        return len(self.bin_offsets) - 1

    @property
    def bin_lengths(self) -> np.ndarray:
        """int64 [B]: tokens in each bin."""
        csum = np.concatenate([[0], np.cumsum(self.item_lengths, dtype=np.int64)])
        return csum[self.bin_offsets[1:]] - csum[self.bin_offsets[:-1]]

    @property
    def efficiency(self) -> float:
        """Packed tokens / (bins * capacity); 0.0 with no bins."""
        b = self.num_bins
        return float(self.item_lengths.sum()) / (b * self.capacity) if b else 0.0

    def bin(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, item_starts, item_lengths) of bin b."""
        s = slice(int(self.bin_offsets[b]), int(self.bin_offsets[b + 1]))
        return self.items[s], self.item_starts[s], self.item_lengths[s]


# ----------------------------------------------------------------------------------------------------
# backend choice


def _impl() -> str:
    global _warned_fallback
    if _override_impl is not None:
        if _override_impl not in ("native", "python"):
            raise ValueError(f"_override_impl must be None, 'native' or 'python', got {_override_impl!r}")
        if _override_impl == "native" and _native is None:
            raise RuntimeError("fastsft._packing is not built (pip install -e . with a C++17 compiler)")
        if _override_impl == "python":
            kernel_usage.record("packing", "reference", "the pure-Python packer forced (_override_impl)")
        else:
            kernel_usage.record("packing", "native", impl=_NATIVE_NAME)
        return _override_impl
    if _native is not None:
        kernel_usage.record("packing", "native", impl=_NATIVE_NAME)
        return "native"
    kernel_usage.record("packing", "reference", "fastsft._packing (C++ extension) is not built")
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn("fastsft._packing (C++ extension) is not built; packing uses the slower pure-Python "
                      "path. Rebuild with `pip install -e .` and a C++17 compiler.", RuntimeWarning,
                      stacklevel=3)
    return "python"


_NATIVE_NAME = "C++ fastsft._packing"


def native_available() -> bool:
    return _native is not None


# ----------------------------------------------------------------------------------------------------
# pack


def pack(lengths, capacity: int, *, strategy: str = "bfd", overflow: str = "truncate",
         seed: int | None = None) -> PackResult:
    """Pack sequences of `lengths` into bins of `capacity` tokens (see the module docstring)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64).reshape(-1)
    capacity = int(capacity)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be between 1 and {MAX_CAPACITY}, got {capacity}")
    if lengths.size and lengths.min() < 0:
        raise ValueError("lengths must be >= 0")
    seed_u64 = None if seed is None else int(seed) & _MASK64
    if _impl() == "native":
        out = _native.pack(lengths, capacity, STRATEGIES.index(strategy), OVERFLOW.index(overflow),
                           seed_u64 is not None, seed_u64 or 0)
    else:
        out = _pack_py(lengths, capacity, strategy, overflow, seed_u64)
    bin_offsets, items, starts, item_lengths, counts = out
    return PackResult(bin_offsets, items, starts, item_lengths, capacity,
                      truncated=int(counts[0]), split=int(counts[1]), dropped=int(counts[2]))


def _pack_py(lengths: np.ndarray, capacity: int, strategy: str, overflow: str, seed: int | None):
    items, starts, lens, counts = _overflow_py(lengths, capacity, overflow)
    if strategy == "bfd":
        order = np.argsort(-lens, kind="stable")  # decreasing, ties in stream order
        bin_of, nbins = _place_best_fit_py(lens[order].tolist(), capacity)
    else:
        order = np.arange(len(lens), dtype=np.int64)
        bin_of, nbins = _place_first_fit_py(lens.tolist(), capacity)
    perm = _shuffle_py(nbins, seed)
    rank = np.empty(nbins, np.int64)
    rank[perm] = np.arange(nbins, dtype=np.int64)        # bin b is output bin rank[b]
    key = rank[np.asarray(bin_of, dtype=np.int64)]
    grouped = order[np.argsort(key, kind="stable")]      # by output bin, placement order within
    bin_offsets = np.zeros(nbins + 1, np.int64)
    np.cumsum(np.bincount(key, minlength=nbins), out=bin_offsets[1:])
    return bin_offsets, items[grouped], starts[grouped], lens[grouped], counts


def _overflow_py(lengths: np.ndarray, capacity: int, overflow: str):
    """The item stream: (items, starts, lengths, (truncated, split, dropped))."""
    n = len(lengths)
    long = lengths > capacity
    num_long = int(np.count_nonzero(long))
    if overflow == "truncate":
        return (np.arange(n, dtype=np.int64), np.zeros(n, np.int64), np.minimum(lengths, capacity),
                (num_long, 0, 0))
    if overflow == "drop":
        keep = np.flatnonzero(~long).astype(np.int64)
        return keep, np.zeros(len(keep), np.int64), lengths[keep], (0, 0, num_long)
    pieces = np.maximum(1, -(-lengths // capacity))      # a zero-length sequence is one empty item
    items = np.repeat(np.arange(n, dtype=np.int64), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = (np.arange(len(items), dtype=np.int64) - first) * capacity
    lens = np.minimum(capacity, lengths[items] - starts)
    return items, starts, lens, (0, num_long, 0)


def _place_best_fit_py(lens: list[int], capacity: int) -> tuple[list[int], int]:
    """Best fit over items already in placement order; returns (bin of each item, number of bins)."""
    caps: list[int] = []                 # sorted remaining capacities that have open bins
    buckets: dict[int, list[int]] = {}   # remaining capacity -> bins (a stack)
    bin_of = [0] * len(lens)
    nbins = 0
    for k, x in enumerate(lens):
        j = bisect_left(caps, x)
        if j < len(caps):
            c = caps[j]
            stack = buckets[c]
            b = stack.pop()
            if not stack:
                del caps[j]
        else:
            b, c = nbins, capacity
            nbins += 1
        r = c - x
        stack = buckets.get(r)
        if stack:
            stack.append(b)
        else:
            buckets[r] = [b]
            insort(caps, r)
        bin_of[k] = b
    return bin_of, nbins


def _place_first_fit_py(lens: list[int], capacity: int) -> tuple[list[int], int]:
    """First fit in stream order via a segment tree of max remaining capacity over bin slots."""
    size = 1
    while size < max(1, len(lens)):
        size *= 2
    tree = [-1] * (2 * size)             # unopened slots hold -1 so they never fit
    bin_of = [0] * len(lens)
    nbins = 0
    for k, x in enumerate(lens):
        if tree[1] >= x:
            i = 1
            while i < size:              # descend to the leftmost leaf with room
                i = 2 * i if tree[2 * i] >= x else 2 * i + 1
            b = i - size
        else:
            b = nbins
            nbins += 1
            i = b + size
            tree[i] = capacity
        tree[i] -= x
        i //= 2
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            tree[i] = left if left >= right else right
            i //= 2
        bin_of[k] = b
    return bin_of, nbins


def splitmix64(seed: int, n: int) -> np.ndarray:
    """uint64 [n]: the first n outputs of splitmix64 started at `seed` (vectorised)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _MASK64) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _shuffle_py(n: int, seed: int | None) -> np.ndarray:
    """Output order of n bins: identity without a seed, else Fisher-Yates on splitmix64."""
    if seed is None or n < 2:
        return np.arange(n, dtype=np.int64)
    i = np.arange(n - 1, 0, -1, dtype=np.uint64)        # i = n-1 .. 1, one draw each
    js = (splitmix64(seed, n - 1) % (i + np.uint64(1))).tolist()
    perm = list(range(n))
    for i, j in zip(range(n - 1, 0, -1), js):
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# assembly


def _check_store(ids, labels, offsets):
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if ids.shape != labels.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and labels {labels.shape} must be 1-D and equal")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError("offsets must be 1-D, start at 0 and end at len(ids)")
    return ids, labels, offsets


def _check_items(offsets, items, starts, lens):
    items = np.ascontiguousarray(items, dtype=np.int64).reshape(-1)
    starts = np.ascontiguousarray(starts, dtype=np.int64).reshape(-1)
    lens = np.ascontiguousarray(lens, dtype=np.int64).reshape(-1)
    if not len(items) == len(starts) == len(lens):
        raise ValueError("items, item_starts and item_lengths must have the same length")
    n = len(offsets) - 1
    if len(items) and (items.min() < 0 or items.max() >= n):
        raise ValueError(f"item index out of range for a store of {n} records")
    if len(items) and (starts.min() < 0 or lens.min() < 0
                       or np.any(starts + lens > offsets[items + 1] - offsets[items])):
        raise ValueError("item_starts/item_lengths reach outside their record")
    return items, starts, lens


def assemble(ids, labels, offsets, items, item_starts, item_lengths) -> dict:
    """One bin -> {input_ids int64 [T], targets int64 [T], position_ids int64 [T],
    cu_seqlens int32 [S+1], max_seqlen int}; T = sum(item_lengths), S = len(items).
    Rules in the module docstring."""
    ids, labels, offsets = _check_store(ids, labels, offsets)
    items, starts, lens = _check_items(offsets, items, item_starts, item_lengths)
    if _impl() == "native":
        return _native.assemble(ids, labels, offsets, items, starts, lens)
    return _assemble_py(ids, labels, offsets, items, starts, lens)


def _assemble_py(ids, labels, offsets, items, starts, lens) -> dict:
    cu = np.zeros(len(items) + 1, np.int64)
    np.cumsum(lens, out=cu[1:])
    t = np.arange(cu[-1], dtype=np.int64)
    src = np.repeat(offsets[items] + starts - cu[:-1], lens) + t     # store position of token t
    nxt = src + 1
    valid = nxt < np.repeat(offsets[items + 1], lens)                 # next token in the same record
    targets = np.full(len(t), IGNORE_INDEX, np.int64)
    targets[valid] = labels[nxt[valid]]
    return {
        "input_ids": ids[src].astype(np.int64),
        "targets": targets,
        "position_ids": t - np.repeat(cu[:-1], lens),
        "cu_seqlens": cu.astype(np.int32),
        "max_seqlen": int(lens.max()) if len(lens) else 0,
    }


def assemble_bins(ids, labels, offsets, items, item_starts, item_lengths, bin_offsets, bins,
                  pad_to: int | None = None, pad_id: int = 0) -> dict:
    """Several bins of a PackResult -> one padded row each.

    Returns, with R = len(bins) and P = pad_to (default: the longest selected bin):
      input_ids     int64 [R, P]  row r holds bin bins[r] as `assemble` lays it out, then pad_id
      targets       int64 [R, P]  -100 on padding
      position_ids  int64 [R, P]  restart at 0 per sequence; 0 on padding
      row_lengths   int64 [R]     real (unpadded) tokens per row
      cu_seqlens    int32 [S+1]   segment boundaries over the rows' real tokens concatenated in row
                                  order, i.e. over input_ids[np.arange(P) < row_lengths[:, None]]
      max_seqlen    int           longest segment
    Raises ValueError when a selected bin is longer than pad_to.
    """
    ids, labels, offsets = _check_store(ids, labels, offsets)
    items, starts, lens = _check_items(offsets, items, item_starts, item_lengths)
    bin_offsets = np.ascontiguousarray(bin_offsets, dtype=np.int64).reshape(-1)
    bins = np.ascontiguousarray(bins, dtype=np.int64).reshape(-1)
    nb = len(bin_offsets) - 1
    if nb < 0 or bin_offsets[0] != 0 or bin_offsets[-1] != len(items) or np.any(np.diff(bin_offsets) < 0):
        raise ValueError("bin_offsets must be non-decreasing from 0 to len(items)")
    if len(bins) and (bins.min() < 0 or bins.max() >= nb):
        raise ValueError(f"bin index out of range for {nb} bins")
    csum = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    row_lengths = csum[bin_offsets[bins + 1]] - csum[bin_offsets[bins]]
    longest = int(row_lengths.max()) if len(bins) else 0
    width = longest if pad_to is None else int(pad_to)
    if width < longest:
        raise ValueError(f"pad_to={width} is shorter than the longest selected bin ({longest} tokens)")
    if _impl() == "native":
        return _native.assemble_bins(ids, labels, offsets, items, starts, lens, bin_offsets, bins,
                                     width, int(pad_id))
    sel = np.concatenate([np.arange(bin_offsets[b], bin_offsets[b + 1], dtype=np.int64) for b in bins]
                         ) if len(bins) else np.zeros(0, np.int64)
    flat = _assemble_py(ids, labels, offsets, items[sel], starts[sel], lens[sel])
    mask = np.arange(width, dtype=np.int64) < row_lengths[:, None]
    out = {}
    for name, fill in (("input_ids", int(pad_id)), ("targets", IGNORE_INDEX), ("position_ids", 0)):
        a = np.full((len(bins), width), fill, np.int64)
        a[mask] = flat[name]
        out[name] = a
    out.update(row_lengths=row_lengths, cu_seqlens=flat["cu_seqlens"], max_seqlen=flat["max_seqlen"])
    return out
