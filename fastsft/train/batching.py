"""Micro-batches from the token store: the epoch's order, and padded batch assembly.

The order of an epoch is a pure function of (seed, epoch), so a resumed run rebuilds it and skips to
its saved position instead of storing it. Batches are right-padded: with causal attention, pad tokens
at the end of a row are never seen by the real tokens before them, so no attention mask is needed.
Targets are shifted here: ``targets[t]`` is the label of token ``t + 1`` of the same sequence, or -100.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100

# Sorting by length inside windows of this many batches keeps padding low while the batch order stays
# random; a window of 50 batches is what length-grouped samplers commonly use.
LENGTH_GROUP_BATCHES = 50


def _stream(seed, epoch: int) -> list[int]:
    """The RNG stream of an epoch: (seed, epoch), or (seed, phase, epoch) for a curriculum phase."""
    return [*seed, epoch] if isinstance(seed, (list, tuple)) else [seed, epoch]


def epoch_batches(lengths: np.ndarray, micro_batch_size: int, seed, epoch: int,
                  group_by_length: bool = True) -> list[np.ndarray]:
    """Record indices of every micro-batch of one epoch (the last may be smaller)."""
    rng = np.random.default_rng(_stream(seed, epoch))
    order = rng.permutation(len(lengths))
    if group_by_length:
        window = micro_batch_size * LENGTH_GROUP_BATCHES
        for s in range(0, len(order), window):
            chunk = order[s : s + window]
            order[s : s + window] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    batches = [order[s : s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(store, indices: np.ndarray, pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, shifted ``targets`` and ``position_ids``, all ``[B, T]``."""
    lengths = store.lengths[indices]
    width = int(lengths.max())
    width = -(-width // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    targets = np.full((len(indices), width), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(indices):
        ids, labels = store[int(i)]
        n = len(ids)
        input_ids[row, :n] = ids
        targets[row, : n - 1] = labels[1:]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "position_ids": torch.arange(width).repeat(len(indices), 1),
        "lengths": torch.from_numpy(lengths.astype(np.int64)),  # each row's real tokens (NEFTune, the KL mask)
        "num_tokens": int(lengths.sum()),
    }


def count_targets(batch: dict) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------------
# packed batches: several sequences a row, attention kept within each sequence through cu_seqlens


def packed_epoch_batches(num_bins: int, bins_per_batch: int, seed, epoch: int) -> list[np.ndarray]:
    """Bin indices of every micro-batch of one epoch: the bins in a (seed, epoch)-shuffled order."""
    order = np.random.default_rng(_stream(seed, epoch)).permutation(num_bins)
    return [order[s : s + bins_per_batch] for s in range(0, num_bins, bins_per_batch)]


def collate_packed(store, plan, bins: np.ndarray, pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """Rows of packed bins ``[R, width]`` and ``cu_seqlens`` over the flattened ``R * width`` tokens.

    Each row's tail padding becomes one more segment of its own, so every token belongs to a segment
    and no attention row is empty.
    """
    from fastsft import packing

    out = packing.assemble_bins(store.ids, store.labels, store.offsets, plan.items, plan.item_starts,
                                plan.item_lengths, plan.bin_offsets, bins, pad_to=width, pad_id=pad_id)
    real = out["cu_seqlens"].astype(np.int64)
    row_lengths = out["row_lengths"]
    row_start = np.concatenate([[0], np.cumsum(row_lengths)])  # rows in the concatenated real tokens
    bounds = []
    for r in range(len(bins)):
        inner = real[(real >= row_start[r]) & (real <= row_start[r + 1])] - row_start[r] + r * width
        bounds.append(inner)
        if row_lengths[r] < width:
            bounds.append(np.array([(r + 1) * width]))
    cu = np.unique(np.concatenate(bounds + [np.array([0])]))
    return {
        "input_ids": torch.from_numpy(out["input_ids"]),
        "targets": torch.from_numpy(out["targets"]),
        "position_ids": torch.from_numpy(out["position_ids"]),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(np.diff(cu).max()) if len(cu) > 1 else 0,
        "row_lengths": torch.from_numpy(np.asarray(row_lengths, dtype=np.int64)),  # real tokens, then padding
        "num_tokens": int(row_lengths.sum()),
    }


# ----------------------------------------------------------------------------------------------------
# the order of the micro-batches: shuffled, or a curriculum's phases easy -> hard


def curriculum_phases(scores: np.ndarray, phases: int) -> list[np.ndarray]:
    """Record indices of ``phases`` groups of (nearly) equal size by ascending score (easy first); ties
    keep the store's order. Records without a score (NaN: replay text under a ``field:NAME`` curriculum)
    are split evenly over the phases (in store order, which is shuffled), so each phase replays its share."""
    scores = np.asarray(scores, dtype=np.float64)
    unscored = np.isnan(scores)
    scored = np.flatnonzero(~unscored)
    order = scored[np.argsort(scores[scored], kind="stable")]
    parts = np.array_split(order, phases) if len(order) else [order] * phases
    extra = np.array_split(np.flatnonzero(unscored), phases)
    return [np.sort(np.concatenate([p, x])) for p, x in zip(parts, extra) if len(p) + len(x)]


class BatchOrder:
    """The micro-batches of every epoch, as a pure function of (seed, epoch) so a resumed run rebuilds
    them: packed bins of ``max_seq_len`` tokens (best-fit decreasing) or one padded record a row, in a
    shuffled order -- or, with ``phases`` (record index groups, easiest first), each phase packed and
    shuffled on its own and the phases in order, so no batch and no packed row mixes two phases; every
    epoch repeats the schedule.

    ``per_token``: arrays whose row t belongs to token t of ``store`` (the base's cached top-k); each batch
    gets them laid out like its tokens, ``[B, T, ...]``, under the same names (zeros on padding)."""

    def __init__(self, store, *, micro_batch_size: int, seed: int, pad_id: int, packing: bool,
                 max_seq_len: int, group_by_length: bool = True, phases: list[np.ndarray] | None = None,
                 per_token: dict[str, np.ndarray] | None = None):
        from fastsft.packing import pack

        self.store, self.mbs, self.seed, self.pad_id = store, micro_batch_size, seed, pad_id
        self.packing, self.max_seq_len, self.group_by_length = packing, max_seq_len, group_by_length
        self.phases = [np.arange(len(store))] if phases is None else [np.asarray(p, np.int64) for p in phases]
        self.curriculum = phases is not None
        self.stores = [store if not self.curriculum else store.select(p) for p in self.phases]
        self.per_token = per_token or {}
        # where each token of a phase's store sits in `store` (the rows of the per-token arrays)
        self.positions = ([np.arange(store.num_tokens) if not self.curriculum else store.token_positions(p)
                           for p in self.phases] if self.per_token else None)
        self.plans = [pack(s.lengths, max_seq_len, strategy="bfd") for s in self.stores] if packing else None
        sizes = [len(p.bin_offsets) - 1 for p in self.plans] if packing else [len(s) for s in self.stores]
        self.units_per_phase = sizes
        self.num_units = sum(sizes)
        self.batches_per_epoch = sum(-(-n // micro_batch_size) for n in sizes)

    @property
    def efficiency(self) -> float:
        """Real tokens / packed token slots (packing only)."""
        real = sum(int(s.lengths.sum()) for s in self.stores)
        return real / max(self.num_units * self.max_seq_len, 1)

    def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        """(phase, units) of every micro-batch of epoch ``e``: bin indices of that phase's packing, or
        record indices of its store."""
        out = []
        for k, (store, n) in enumerate(zip(self.stores, self.units_per_phase)):
            # phase k of epoch e draws from its own stream; without a curriculum, the plain (seed, epoch) one
            seed = [self.seed, k] if self.curriculum else self.seed
            if self.packing:
                batches = packed_epoch_batches(n, self.mbs, seed, e)
            else:
                batches = epoch_batches(store.lengths, self.mbs, seed, e, self.group_by_length)
            out.extend((k, b) for b in batches)
        return out

    def batch(self, unit: tuple[int, np.ndarray]) -> dict:
        k, units = unit
        store = self.stores[k]
        if self.packing:
            batch = collate_packed(store, self.plans[k], units, self.pad_id, self.max_seq_len)
        else:
            batch = collate(store, units, self.pad_id)
        if self.per_token:
            rows = self._token_rows(k, units, batch["input_ids"].shape[1])
            for name, array in self.per_token.items():
                out = array[np.clip(rows, 0, None)]
                out[rows < 0] = 0
                batch[name] = torch.from_numpy(out)
        return batch

    def _token_rows(self, k: int, units: np.ndarray, width: int) -> np.ndarray:
        """int64 [B, width]: the row of the per-token arrays behind each slot of a batch (-1: padding), laid
        out by the same assembly as the tokens."""
        from fastsft import packing

        store, positions = self.stores[k], self.positions[k]
        if self.packing:
            plan = self.plans[k]
            return packing.assemble_bins(positions.astype(np.int32), store.labels, store.offsets, plan.items,
                                         plan.item_starts, plan.item_lengths, plan.bin_offsets, units,
                                         pad_to=width, pad_id=-1)["input_ids"]
        rows = np.full((len(units), width), -1, np.int64)
        for r, i in enumerate(units):
            a, b = store.offsets[int(i)], store.offsets[int(i) + 1]
            rows[r, : b - a] = positions[a:b]
        return rows
