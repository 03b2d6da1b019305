"""What the base model computes once, before training, and where it is kept.

- :func:`compute_base_topk`: the base's top-k next-token log-probs for every token of a store, behind
  ``train.kl_base_topk`` (the KL anchor without a base forward during training; see fastsft.loss_kl_topk).
- :func:`cached_arrays`: such arrays (and the curriculum's base-loss scores) read from the run's ``data/``
  (resume), or from the token cache (a rerun on the same data and base), or computed, saved and kept.

Row t of the top-k arrays belongs to token t of the store (its flat position in ``store.ids``) and describes the
base's prediction of the token after it: ``ids[t]`` the k most likely tokens, ``logp[t, :k]`` their
log-probs, ``logp[t, k]`` the log of the remaining mass. The last token of each record predicts nothing
(zeros; never covered by the loss). Size: ``8k + 4`` bytes a token.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastsft.data import cache as token_cache
from fastsft.model.lora import adapters_disabled
from fastsft.train.batching import collate
from fastsft.train.files import atomic_write_array, human_bytes, writing

# Rows of float32 logits handled at once in the head matmul of the pass.
_CHUNK_BYTES = 64 * 1024 * 1024


@torch.no_grad()
def compute_base_topk(model, store, k: int, *, pad_id: int, batch_size: int, device,
                      autocast=contextlib.nullcontext) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T, k], logp float32 [T, k + 1]) from one no-grad pass of the model with its adapters off
    (the base), in eval mode; records in batches of similar length."""
    vocab = model.lm_head.weight.shape[0]
    if not 0 < k < vocab:
        raise ValueError(f"train.kl_base_topk must be between 1 and the vocabulary size - 1 ({vocab - 1}), got {k}")
    ids_out = np.zeros((store.num_tokens, k), np.int32)
    logp_out = np.zeros((store.num_tokens, k + 1), np.float32)
    weight = model.lm_head.weight
    bias = getattr(model.lm_head, "bias", None)
    softcap = model.config.final_logit_softcapping
    rows_per_chunk = max(1, _CHUNK_BYTES // (4 * vocab))
    was_training = model.training
    model.eval()
    try:
        order = np.argsort(store.lengths, kind="stable")
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate(store, idx, pad_id)
            with autocast(), adapters_disabled(model):
                hidden = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device))
            lengths = store.lengths[idx]
            width = hidden.shape[1]
            # every position but each record's last (which predicts nothing), and where it sits in the store
            valid = np.arange(width)[None, :] < (lengths[:, None] - 1)
            where = (store.offsets[idx][:, None] + np.arange(width)[None, :])[valid]
            rows = hidden[torch.from_numpy(valid).to(hidden.device)]
            for c in range(0, rows.shape[0], rows_per_chunk):
                z = (rows[c : c + rows_per_chunk] @ weight.t()).float()
                if bias is not None:
                    z = z + bias.float()
                if softcap is not None:
                    z = softcap * torch.tanh(z / softcap)
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                top, top_ids = z.topk(k, dim=-1)
                tail = torch.logsumexp(z.scatter_(1, top_ids, float("-inf")), dim=-1, keepdim=True)
                at = where[c : c + rows_per_chunk]
                ids_out[at] = top_ids.int().cpu().numpy()
                logp_out[at] = torch.cat([top - lse, tail - lse], dim=-1).cpu().numpy()
    finally:
        model.train(was_training)
    return ids_out, logp_out



def cached_arrays(names: Sequence[str], shapes: Sequence[tuple], compute: Callable[[], Sequence[np.ndarray]], *,
                  data_dir: Path, cache_key: str | None, fingerprint: str | None, is_main: bool, what: str,
                  say: Callable[[str], None], mmap: bool = False) -> tuple[list[np.ndarray], bool]:
    """``(arrays, computed)``: ``data_dir/<name>.npy`` for each name when all are there with the right shapes
    (a resumed run: the model is no longer the base, so they are never recomputed); else the token cache's copy
    for this base (``fingerprint``), copied into ``data_dir``; else ``compute()``, timed, saved to ``data_dir``
    (rank 0) and kept in the cache. Large arrays are read through a memory map with ``mmap``."""
    paths = [data_dir / f"{name}.npy" for name in names]

    def read(files):
        try:
            arrays = [np.load(p, allow_pickle=False, mmap_mode="r" if mmap else None) for p in files]
        except (OSError, ValueError):
            return None
        return arrays if all(a.shape == tuple(s) for a, s in zip(arrays, shapes)) else None

    if all(p.exists() for p in paths):
        arrays = read(paths)
        if arrays is None:
            raise ValueError(f"{data_dir}: {', '.join(p.name for p in paths)} do not fit the run's token stores "
                             f"(expected shapes {', '.join(str(tuple(s)) for s in shapes)}); the run's data changed")
        return arrays, False
    cached = [token_cache.load_side(cache_key, fingerprint, name, shape, mmap=mmap)
              for name, shape in zip(names, shapes)]
    if all(a is not None for a in cached):
        say(f"{what}: from the token cache")
        arrays, computed = cached, False
    else:
        started = time.time()
        arrays, computed = list(compute()), True
        say(f"{what}: computed in {time.time() - started:.1f}s "
            f"({human_bytes(sum(a.nbytes for a in arrays))})")
    if is_main:
        with writing(data_dir, what):
            data_dir.mkdir(parents=True, exist_ok=True)
            for path, array in zip(paths, arrays):
                atomic_write_array(path, array)
        if computed:
            for name, path in zip(names, paths):
                token_cache.keep_side(cache_key, fingerprint, name, path)
    return arrays, computed
