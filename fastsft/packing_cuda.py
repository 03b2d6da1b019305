"""Packed-batch assembly on the GPU: `fastsft.packing.assemble_bins` with the token work on the device.

    store_gpu = store_to_device(store, "cuda")        # once: ids, labels, offsets
    plan = packing.pack(store.lengths, 2048)
    batch = assemble_bins_cuda(store_gpu, plan, bins=[0, 1, 2, 3], pad_to=2048)

The host does O(items) numpy work per batch (which items, where each lands in the [R, P] layout,
row lengths, cu_seqlens), uploads it in one int64 buffer, and the device writes every token slot.
Results equal `fastsft.packing.assemble_bins` value for value (same rules, see its module docstring).

Two implementations:

  cuda    fastsft_assemble_cuda (csrc/assemble_cuda.cu + csrc/assemble_torch.cpp), JIT-built by
          torch.utils.cpp_extension.load on first use (never at import), cached for the process
  torch   `_assemble_bins_torch`: the same plan applied with vectorised torch ops; runs on any device,
          is the fallback when the extension cannot be built (no nvcc/ninja) and a second oracle

The choice is made per call: CUDA tensors use the extension when it builds, anything else uses torch.
`_override_impl` (None | "cuda" | "torch") lets tests and benchmarks force one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from fastsft.packing import IGNORE_INDEX, PackResult

CSRC = Path(__file__).resolve().parents[1] / "csrc"
EXTENSION_NAME = "fastsft_assemble_cuda"

_override_impl: str | None = None  # None (auto) | "cuda" | "torch"
_module = None                     # the built extension, once loaded
_build_error: Exception | None = None


# ----------------------------------------------------------------------------------------------------
# backend choice


def cuda_available() -> bool:
    """True when torch is a CUDA build and sees a GPU (the extension may still fail to build)."""
    return torch.version.cuda is not None and torch.cuda.is_available()


def _load_extension():
    """The compiled module, building it on first use; None (with one warning) when the build fails."""
    global _module, _build_error
    if _module is not None or _build_error is not None:
        return _module
    if not cuda_available():
        _build_error = RuntimeError("fastsft_assemble_cuda needs a CUDA build of torch and a GPU")
        return None
    try:
        from torch.utils.cpp_extension import load

        _module = load(name=EXTENSION_NAME,
                       sources=[str(CSRC / "assemble_torch.cpp"), str(CSRC / "assemble_cuda.cu")],
                       extra_include_paths=[str(CSRC)],
                       extra_cflags=["-O3", "-std=c++17"],
                       extra_cuda_cflags=["-O3", "-std=c++17"])
    except Exception as e:  # no nvcc / ninja / compiler: keep the torch path
        _build_error = e
        warnings.warn(f"{EXTENSION_NAME} could not be built ({type(e).__name__}: {e}); GPU batch "
                      "assembly uses the slower torch path.", RuntimeWarning, stacklevel=3)
    return _module


def _impl(device: torch.device) -> str:
    if _override_impl is not None:
        if _override_impl not in ("cuda", "torch"):
            raise ValueError(f"_override_impl must be None, 'cuda' or 'torch', got {_override_impl!r}")
        if _override_impl == "cuda":
            if device.type != "cuda":
                raise RuntimeError(f"the cuda implementation needs CUDA tensors, got device {device}")
            if _load_extension() is None:
                raise RuntimeError(f"{EXTENSION_NAME} is not available: {_build_error}")
        return _override_impl
    if device.type == "cuda" and _load_extension() is not None:
        return "cuda"
    return "torch"


# ----------------------------------------------------------------------------------------------------
# store upload


def store_to_device(store, device="cuda") -> dict:
    """Upload a TokenStore's ids (int32), labels (int32) and offsets (int64) once.

    The dict also keeps `offsets_host` (the store's own numpy array, not a copy) so that each batch's
    plan can be checked against record lengths on the host without a device sync.
    """
    ids = np.ascontiguousarray(store.ids, dtype=np.int32)
    labels = np.ascontiguousarray(store.labels, dtype=np.int32)
    offsets = np.ascontiguousarray(store.offsets, dtype=np.int64)
    if ids.shape != labels.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and labels {labels.shape} must be 1-D and equal")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError("offsets must be 1-D, start at 0 and end at len(ids)")
    device = torch.device(device)
    return {
        "ids": torch.from_numpy(ids).to(device),
        "labels": torch.from_numpy(labels).to(device),
        "offsets": torch.from_numpy(offsets).to(device),
        "offsets_host": offsets,
    }


def _check_store_tensors(store_gpu: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, labels, offsets = store_gpu["ids"], store_gpu["labels"], store_gpu["offsets"]
    for name, t, dtype in (("ids", ids, torch.int32), ("labels", labels, torch.int32),
                           ("offsets", offsets, torch.int64)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"store_gpu[{name!r}] must be a contiguous 1-D {dtype} tensor "
                             f"(use store_to_device), got {getattr(t, 'dtype', type(t))}")
        if t.device != ids.device:
            raise ValueError(f"store_gpu[{name!r}] is on {t.device} but ids is on {ids.device}")
    if labels.numel() != ids.numel() or offsets.numel() < 1:
        raise ValueError("store_gpu: ids and labels must be equal length and offsets non-empty")
    return ids, labels, offsets


# ----------------------------------------------------------------------------------------------------
# host plan: O(selected items), no per-token work


def _plan(plan: PackResult, bins, pad_to, num_records: int, offsets_host: np.ndarray | None):
    """Per-item arrays for the selected bins, in row order.

    Returns (meta int64 [4K + R + 1] = items | starts | item_out | cu | row_lengths, K, R, P,
    total tokens, max_seqlen). item_out[k] = row * P + column of item k's first token.
    """
    bin_offsets = np.ascontiguousarray(plan.bin_offsets, dtype=np.int64).reshape(-1)
    items = np.ascontiguousarray(plan.items, dtype=np.int64).reshape(-1)
    starts = np.ascontiguousarray(plan.item_starts, dtype=np.int64).reshape(-1)
    lens = np.ascontiguousarray(plan.item_lengths, dtype=np.int64).reshape(-1)
    bins = np.ascontiguousarray(bins, dtype=np.int64).reshape(-1)
    if not len(items) == len(starts) == len(lens):
        raise ValueError("items, item_starts and item_lengths must have the same length")
    nb = len(bin_offsets) - 1
    if nb < 0 or bin_offsets[0] != 0 or bin_offsets[-1] != len(items) or np.any(np.diff(bin_offsets) < 0):
        raise ValueError("bin_offsets must be non-decreasing from 0 to len(items)")
    if len(bins) and (bins.min() < 0 or bins.max() >= nb):
        raise ValueError(f"bin index out of range for {nb} bins")

    # ---- the selected items, row by row
    counts = bin_offsets[bins + 1] - bin_offsets[bins]               # items per row [R]
    row_first = np.zeros(len(bins) + 1, np.int64)                    # row r: sel[row_first[r]:row_first[r+1]]
    np.cumsum(counts, out=row_first[1:])
    num_sel = int(row_first[-1])
    sel = np.repeat(bin_offsets[bins] - row_first[:-1], counts) + np.arange(num_sel, dtype=np.int64)
    s_items, s_starts, s_lens = items[sel], starts[sel], lens[sel]
    if num_sel:
        if s_items.min() < 0 or s_items.max() >= num_records:
            raise ValueError(f"item index out of range for a store of {num_records} records")
        if s_starts.min() < 0 or s_lens.min() < 0:
            raise ValueError("item_starts/item_lengths must be >= 0")
        if offsets_host is not None and np.any(
                s_starts + s_lens > offsets_host[s_items + 1] - offsets_host[s_items]):
            raise ValueError("item_starts/item_lengths reach outside their record")

    # ---- layout
    cu = np.zeros(num_sel + 1, np.int64)
    np.cumsum(s_lens, out=cu[1:])
    row_lengths = cu[row_first[1:]] - cu[row_first[:-1]]
    longest = int(row_lengths.max()) if len(bins) else 0
    width = longest if pad_to is None else int(pad_to)
    if width < longest:
        raise ValueError(f"pad_to={width} is shorter than the longest selected bin ({longest} tokens)")
    row_of = np.repeat(np.arange(len(bins), dtype=np.int64), counts)
    item_out = row_of * width + (cu[:-1] - cu[row_first[:-1]][row_of])
    meta = np.concatenate([s_items, s_starts, item_out, cu, row_lengths])
    max_seqlen = int(s_lens.max()) if num_sel else 0
    return meta, num_sel, len(bins), width, int(cu[-1]), max_seqlen


# ----------------------------------------------------------------------------------------------------
# assembly


def assemble_bins_cuda(store_gpu: dict, plan: PackResult, bins, pad_to: int | None = None,
                       pad_id: int = 0) -> dict:
    """Bins `bins` of `plan` -> one padded row each, as device tensors on the store's device.

    Returns input_ids / targets / position_ids int64 [R, P], row_lengths int64 [R], cu_seqlens int32
    [S+1] (over the rows' real tokens concatenated) and max_seqlen (int): the values of
    `fastsft.packing.assemble_bins(...)` for the same store, plan and arguments.
    Raises ValueError when a selected bin is longer than pad_to.
    """
    ids, labels, offsets = _check_store_tensors(store_gpu)
    meta, k, r, p, total, max_seqlen = _plan(plan, bins, pad_to, offsets.numel() - 1,
                                             store_gpu.get("offsets_host"))
    device = ids.device
    meta_d = torch.from_numpy(meta).to(device, non_blocking=True)  # one upload per batch
    s_items, s_starts, item_out, cu, row_lengths = torch.split(meta_d, [k, k, k, k + 1, r])
    if _impl(device) == "cuda":
        input_ids, targets, position_ids = _load_extension().assemble_bins(
            ids, labels, offsets, s_items, s_starts, item_out, row_lengths, p, int(pad_id))
    else:
        input_ids, targets, position_ids = _assemble_bins_torch(
            ids, labels, offsets, s_items, s_starts, item_out, cu, r, p, total, int(pad_id))
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids,
            "row_lengths": row_lengths, "cu_seqlens": cu.to(torch.int32), "max_seqlen": max_seqlen}


def _assemble_bins_torch(ids, labels, offsets, items, starts, item_out, cu, rows, width, total, pad_id):
    """The kernel's rules with vectorised torch ops (one gather/scatter per output, no host sync)."""
    device = ids.device
    lens = cu[1:] - cu[:-1]
    k = torch.repeat_interleave(torch.arange(len(items), device=device), lens, output_size=total)
    t = torch.arange(total, device=device) - cu[k]                 # position within the item
    rec = items[k]
    src = offsets[rec] + starts[k] + t                              # store position of each token
    nxt = src + 1
    valid = nxt < offsets[rec + 1]                                  # next token in the same record
    nxt_label = labels[nxt.clamp(max=max(ids.numel() - 1, 0))].long()
    slot = item_out[k] + t
    out = []
    for fill, values in ((pad_id, ids[src].long()),
                         (IGNORE_INDEX, torch.where(valid, nxt_label, IGNORE_INDEX)),
                         (0, t)):
        a = torch.full((rows * width,), fill, dtype=torch.int64, device=device)
        a[slot] = values
        out.append(a.view(rows, width))
    return out
