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


def epoch_batches(lengths: np.ndarray, micro_batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[np.ndarray]:
    """Record indices of every micro-batch of one epoch (the last may be smaller)."""
    rng = np.random.default_rng([seed, epoch])
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
        "num_tokens": int(lengths.sum()),
    }


def count_targets(batch: dict) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())
