"""LLaVA JSON records -> a token store plus each record's images; images -> pixels; images' places in batches.

    {"id": ..., "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] | absent,
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}]}

Each ``<image>`` placeholder becomes ``num_image_tokens`` copies of ``image_token_id`` (N = the tower's patches,
minus CLS under "default"), labelled -100. A record whose conversation has no placeholder for its image gets
``<image>\\n`` before its first human turn (LLaVA's convention); placeholders without images, or in an assistant
turn, are errors. Two modes:

    instruct  (stage 2)  the conversation rendered as the sharegpt format renders it (the tokenizer's chat
                         template, ChatML without one): assistant turns trained, the rest ignored
    caption   (stage 1)  LLaVA's "plain" template: the images, then the caption (the last assistant turn) and
                         EOS, trained; the human text is dropped, everything but the caption ignored

The text between placeholders is tokenised piece by piece (a placeholder splits the text the way a special
token does in transformers' processor). Records without an image train as text. Truncation to max_seq_len
never cuts an image: a record whose cut falls inside an image's tokens is dropped and counted
(``truncation="drop"``) or refused (``"error"``); images wholly past the cut leave the record.

A missing, unreadable or corrupt image is a ``file:line: image 'x.jpg': reason`` error (DataError), or a
counted skip with ``skip_bad_records``. Images are decoded once while validating (``check_images``); pixels are
made per batch by :class:`ImageLoader` with the vision model's own image processor.

Batches: :func:`padded_image_layout` / :func:`packed_image_layout` give, for a batch built by
``fastsft.train.batching.collate`` / ``collate_packed`` from ``store.tokens``, the images it holds in token
order (``image_index``: entries of the store's image table) and where each image's first token lies in the
flattened ``[B * T]`` batch (``image_starts``) -- what ``MultimodalCausalLM.forward`` takes beside the pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch

from fastsft.data.errors import DataError, RecordError
from fastsft.data.formats import RawRecord, iter_records, normalize, records_from_memory
from fastsft.data.pipeline import _check_add_bos, _piece_labels
from fastsft.data.store import IGNORE_INDEX, TokenStore
from fastsft.data.templates import TRAIN_ON, render_conversation
from fastsft.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["IMAGE_PLACEHOLDER", "MODES", "TRUNCATION", "MultimodalStore", "ImageLoader", "image_processor",
           "open_image", "encode_llava_record", "truncate_record", "build_llava_store", "load_llava_data",
           "padded_image_layout", "packed_image_layout"]

IMAGE_PLACEHOLDER = "<image>"
MODES = ("instruct", "caption")
TRUNCATION = ("drop", "error")
_BAD_EXAMPLES = 5
_STORE_VERSION = 1


# --------------------------------------------------------------------------- the store
@dataclass
class MultimodalStore:
    """A TokenStore and each record's images: record i's images are entries
    ``image_offsets[i]:image_offsets[i+1]`` of ``image_paths`` (resolved file paths) and ``image_starts`` (the
    image's first token, counted from the record's start); each image spans ``num_image_tokens`` tokens of id
    ``image_token_id``."""
    tokens: TokenStore
    image_offsets: np.ndarray   # int64 [N+1]
    image_starts: np.ndarray    # int64 [M]
    image_paths: np.ndarray     # str [M]
    num_image_tokens: int
    image_token_id: int

    def __post_init__(self):
        self.image_offsets = np.ascontiguousarray(self.image_offsets, dtype=np.int64)
        self.image_starts = np.ascontiguousarray(self.image_starts, dtype=np.int64)
        self.image_paths = np.asarray(self.image_paths, dtype=np.str_).reshape(-1)
        n, m = len(self.tokens), len(self.image_starts)
        if self.image_offsets.shape != (n + 1,) or self.image_offsets[0] != 0 or self.image_offsets[-1] != m:
            raise ValueError(f"image_offsets must run from 0 to {m} over {n} records")
        if len(self.image_paths) != m:
            raise ValueError(f"{len(self.image_paths)} image paths for {m} images")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.lengths

    @property
    def num_images(self) -> int:
        return len(self.image_starts)

    def images_per_record(self) -> np.ndarray:
        return np.diff(self.image_offsets)

    def record_images(self, i: int) -> list[tuple[str, int]]:
        """(path, first token within the record) of record i's images."""
        a, b = self.image_offsets[i], self.image_offsets[i + 1]
        return [(str(p), int(s)) for p, s in zip(self.image_paths[a:b], self.image_starts[a:b])]

    def select(self, indices: Sequence[int] | np.ndarray) -> "MultimodalStore":
        """Records ``indices`` in that order (repeats allowed), as TokenStore.select."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + len(self), idx)
        counts = self.image_offsets[idx + 1] - self.image_offsets[idx]
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        gather = np.repeat(self.image_offsets[idx] - offsets[:-1], counts) + np.arange(offsets[-1], dtype=np.int64)
        return MultimodalStore(self.tokens.select(idx), offsets, self.image_starts[gather], self.image_paths[gather],
                               self.num_image_tokens, self.image_token_id)

    def save(self, path: Union[str, Path]) -> Path:
        """The token store at ``path`` (.npz) and the images beside it (``<name>.images.npz``)."""
        out = self.tokens.save(path)
        side = out.with_name(out.name[: -len(".npz")] + ".images.npz")
        tmp = side.with_name(side.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, image_offsets=self.image_offsets, image_starts=self.image_starts,
                     image_paths=self.image_paths, num_image_tokens=np.asarray(self.num_image_tokens),
                     image_token_id=np.asarray(self.image_token_id), version=np.asarray(_STORE_VERSION))
        os.replace(tmp, side)
        return out

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MultimodalStore":
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        tokens = TokenStore.load(path)
        with np.load(path.with_name(path.name[: -len(".npz")] + ".images.npz"), allow_pickle=False) as z:
            if int(z["version"]) != _STORE_VERSION:
                raise ValueError(f"{path}: multimodal store version {int(z['version'])}, expected {_STORE_VERSION}")
            return cls(tokens, z["image_offsets"], z["image_starts"], z["image_paths"], int(z["num_image_tokens"]),
                       int(z["image_token_id"]))

    def check(self) -> None:
        """Every image's tokens are placeholders and every placeholder belongs to an image (a test of the
        store's invariant; O(tokens))."""
        ids, offsets = self.tokens.ids, self.tokens.offsets
        is_img = ids == self.image_token_id
        covered = np.zeros(len(ids), bool)
        rec = np.repeat(np.arange(len(self)), self.images_per_record())
        for r, s in zip(rec, self.image_starts):
            a = offsets[r] + s
            if a + self.num_image_tokens > offsets[r + 1]:
                raise AssertionError(f"record {r}: an image at token {s} runs past the record's end")
            covered[a:a + self.num_image_tokens] = True
        if not np.array_equal(covered, is_img):
            raise AssertionError("image placeholders and the store's images disagree")
        if np.any(self.tokens.labels[is_img] != IGNORE_INDEX):
            raise AssertionError("an image token is trained")


# --------------------------------------------------------------------------- images
def open_image(path: Union[str, Path]):
    """The decoded RGB PIL image at ``path``; RecordError naming why it cannot be used."""
    from PIL import Image

    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()  # decode everything now: a truncated or corrupt file fails here, not mid-training
            return im.convert("RGB")
    except FileNotFoundError:
        raise RecordError(f"not found ({p})") from None
    except IsADirectoryError:
        raise RecordError(f"is a directory ({p})") from None
    except PermissionError:
        raise RecordError(f"not readable: permission denied ({p})") from None
    except Image.DecompressionBombError as e:
        raise RecordError(f"refused by Pillow as a decompression bomb: {e}") from None
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError ...
        msg = " ".join(str(e).split())[:200]
        raise RecordError(f"cannot be decoded: {type(e).__name__}: {msg} ({p})") from None


def image_processor(source: Any, **overrides):
    """The vision model's own image processor, built locally (nothing downloaded): from a directory with a
    preprocessor_config.json, a dict of processor settings (with ``image_processor_type``), or a transformers
    vision config / its dict (CLIP: resize the shortest edge + center crop to image_size, CLIP's mean/std;
    SigLIP: resize to image_size, mean/std 0.5) -- the processors of the openai/google checkpoints."""
    import transformers

    if isinstance(source, (str, Path)):
        d = Path(source).expanduser()
        if not (d / "preprocessor_config.json").is_file():
            raise ValueError(f"no preprocessor_config.json in {d}")
        return transformers.AutoImageProcessor.from_pretrained(str(d), local_files_only=True, **overrides)
    if isinstance(source, dict) and "image_processor_type" in source:
        kind = source["image_processor_type"].replace("Fast", "")
        cls = getattr(transformers, kind + "Pil", None) or getattr(transformers, kind)
        return cls(**{**{k: v for k, v in source.items() if k != "image_processor_type"}, **overrides})
    from .model import _vision_config

    vc = _vision_config(source)
    size = vc.image_size
    if vc.model_type == "siglip_vision_model":
        return transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, **overrides)
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                              **overrides)


class ImageLoader:
    """Paths -> pixel_values [n, C, H, W] (float32) through ``processor``; ``cache_size`` keeps that many
    images' pixels (an epoch-spanning cache for small data sets; 0: none)."""

    def __init__(self, processor, cache_size: int = 0):
        self.processor, self.cache_size = processor, int(cache_size)
        self._cache: dict[str, torch.Tensor] = {}

    def pixels(self, path: str) -> torch.Tensor:
        t = self._cache.get(path)
        if t is None:
            try:
                im = open_image(path)
            except RecordError as e:
                raise DataError(f"image {path!r}: {e.reason}") from None
            t = self.processor(images=[im], return_tensors="pt")["pixel_values"][0]
            if len(self._cache) < self.cache_size:
                self._cache[path] = t
        return t

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        if not len(paths):
            return torch.zeros(0)
        return torch.stack([self.pixels(str(p)) for p in paths])


# --------------------------------------------------------------------------- records
def _image_list(value: dict) -> list[str]:
    img = value.get("image")
    if img is None:
        return []
    items = img if isinstance(img, list) else [img]
    for k, x in enumerate(items):
        where = "field 'image'" + (f"[{k}]" if isinstance(img, list) else "")
        if not isinstance(x, str) or not x.strip():
            raise RecordError(f"{where} must be a non-empty string (an image path), got {x!r}")
    return list(items)


def _segments(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """``text`` split at each placeholder: (piece, its trained spans in the piece's own coordinates)."""
    out, start = [], 0
    while True:
        k = text.find(IMAGE_PLACEHOLDER, start)
        end = len(text) if k < 0 else k
        local = [(max(a, start) - start, min(b, end) - start) for a, b in spans if a < end and b > start]
        out.append((text[start:end], local))
        if k < 0:
            return out
        start = k + len(IMAGE_PLACEHOLDER)


def encode_llava_record(record: Any, tokenizer: Tokenizer, *, image_dir: Union[str, Path, None],
                        image_token_id: int, num_image_tokens: int, mode: str = "instruct", train_on: str = "all",
                        add_bos: Any = "auto", check_images: bool = True
                        ) -> tuple[list[int], list[int], list[str], list[int]]:
    """One LLaVA record -> (ids, labels, image paths, each image's first token), untruncated. RecordError
    (the reason only) for a bad record or a missing/corrupt image."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    images = _image_list(record)
    messages = normalize(record, "sharegpt")["messages"]
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
            raise RecordError(f"conversations[{i}]: {IMAGE_PLACEHOLDER} in an assistant turn (images belong to the "
                              "prompt)")
    placed = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placed and placed != len(images):
        raise RecordError(f"the conversation has {placed} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} "
                          f"image(s)")
    if not placed and images:  # LLaVA's convention: the images open the first human turn
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise RecordError("the record has an image but no human turn to put it in")
        messages[first] = {**messages[first],
                           "content": (IMAGE_PLACEHOLDER + "\n") * len(images) + messages[first]["content"]}

    if mode == "caption":
        caption = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        segments = [("", [])] * len(images) + [(caption, [(0, len(caption))])]
        append_eos = True
    else:
        text, spans, append_eos = render_conversation(messages, tokenizer, train_on)
        segments = _segments(text, spans)
        if len(segments) - 1 != len(images):
            raise RecordError(f"the chat template renders {len(segments) - 1} of the {len(images)} "
                              f"{IMAGE_PLACEHOLDER} placeholder(s)")

    paths = [str(Path(image_dir) / p) if image_dir is not None else p for p in images]
    if check_images:
        for rel, p in zip(images, paths):
            try:
                open_image(p)
            except RecordError as e:
                raise RecordError(f"image {rel!r}: {e.reason}") from None

    _check_add_bos(add_bos)
    texts = [t for t, _ in segments]
    partial = [bool(s) and s != [(0, len(t))] for t, s in segments]
    try:
        encoded = tokenizer.encode_batch(texts, offsets=partial)
    except (ValueError, TypeError) as e:
        raise RecordError(f"tokenizer failed: {e}") from None
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for k, ((text, spans), (p_ids, p_offs)) in enumerate(zip(segments, encoded)):
        if k:  # an image before this piece
            starts.append(len(ids))
            ids.extend([image_token_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
        ids.extend(p_ids)
        labels.extend(_piece_labels(list(p_ids), p_offs, len(text), spans))
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    if append_eos and eos is not None:
        ids.append(eos)
        labels.append(eos)
    if add_bos is True and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    if add_bos is True or (add_bos == "auto" and bos is not None and (not ids or ids[0] != bos)):
        ids.insert(0, bos)
        labels.insert(0, IGNORE_INDEX)
        starts = [s + 1 for s in starts]
    labels[0] = IGNORE_INDEX  # nothing predicts the first token
    if ids.count(image_token_id) != len(starts) * num_image_tokens:
        raise RecordError(f"the text encodes to the image token id {image_token_id} outside an image")
    if all(lab == IGNORE_INDEX for lab in labels):
        raise RecordError("record has no trained tokens")
    return ids, labels, paths, starts


class _CutImage(Exception):
    pass


def truncate_record(ids: list[int], labels: list[int], starts: list[int], num_image_tokens: int,
                    max_seq_len: int) -> tuple[list[int], list[int], list[int]]:
    """The record cut to ``max_seq_len`` tokens, with the images that still fit whole. Raises _CutImage when
    the cut falls inside an image's tokens (half an image is never kept)."""
    if len(ids) <= max_seq_len:
        return ids, labels, starts
    for k, s in enumerate(starts):
        if s < max_seq_len < s + num_image_tokens:
            raise _CutImage(f"truncated to max_seq_len={max_seq_len} inside image {k}'s tokens "
                            f"({s}..{s + num_image_tokens - 1})")
    return ids[:max_seq_len], labels[:max_seq_len], [s for s in starts if s < max_seq_len]


def build_llava_store(records: Iterable[Any], tokenizer: Any, *, image_dir: Union[str, Path, None],
                      image_token_id: int, num_image_tokens: int, max_seq_len: int, mode: str = "instruct",
                      train_on: str = "all", add_bos: Any = "auto", skip_bad_records: bool = False,
                      truncation: str = "drop", check_images: bool = True, path: str = "<records>"
                      ) -> tuple[MultimodalStore, dict]:
    """LLaVA records (RawRecords as ``fastsft.data.formats.iter_records`` yields them, or plain dicts) -> a
    MultimodalStore and its report. Bad records (bad fields, a missing/unreadable/corrupt image) raise
    ``file:line: reason`` (DataError), or are counted and skipped with ``skip_bad_records``. Truncation never
    keeps half an image: such records are dropped and counted (``truncation="drop"``) or refused
    (``"error"``, a DataError naming the record)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    tokenizer = load_tokenizer(tokenizer)
    records = list(records)
    raws = records if all(isinstance(r, RawRecord) for r in records) else records_from_memory(records)
    ids_parts, label_parts, paths, starts, counts = [], [], [], [], []
    report = {"records_read": 0, "bad_skipped": 0, "bad_examples": [], "dropped_image_cut": 0,
              "dropped_truncated": 0, "truncated": 0, "truncated_tokens": 0, "truncated_trained_tokens": 0,
              "images": 0, "text_only": 0}
    for raw in raws:
        report["records_read"] += 1
        try:
            if raw.error is not None:
                raise raw.error
            ids, labels, p, s = encode_llava_record(raw.value, tokenizer, image_dir=image_dir,
                                                    image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                                                    mode=mode, train_on=train_on, add_bos=add_bos,
                                                    check_images=check_images)
            n, trained = len(ids), sum(lab != IGNORE_INDEX for lab in labels)
            try:
                ids, labels, s = truncate_record(ids, labels, s, num_image_tokens, max_seq_len)
            except _CutImage as e:
                if truncation == "error":
                    raise DataError(f"{e}; raise max_seq_len, or drop such records (truncation: drop)",
                                    **raw.where(path)) from None
                report["dropped_image_cut"] += 1
                continue
        except RecordError as e:
            located = e.at(**raw.where(path))
            if not skip_bad_records:
                raise located from None
            report["bad_skipped"] += 1
            if len(report["bad_examples"]) < _BAD_EXAMPLES:
                report["bad_examples"].append(str(located))
            continue
        if len(ids) < n:
            if all(lab == IGNORE_INDEX for lab in labels):
                report["dropped_truncated"] += 1
                continue
            report["truncated"] += 1
            report["truncated_tokens"] += n - len(ids)
            report["truncated_trained_tokens"] += trained - sum(lab != IGNORE_INDEX for lab in labels)
        ids_parts.append(np.asarray(ids, np.int32))
        label_parts.append(np.asarray(labels, np.int32))
        paths.extend(p[: len(s)])
        starts.extend(s)
        counts.append(len(s))
        report["text_only"] += not s
    if not ids_parts:
        raise DataError(f"no usable records: {report['bad_skipped']} bad, {report['dropped_image_cut']} cut inside "
                        f"an image and {report['dropped_truncated']} without trained tokens after truncation to "
                        f"max_seq_len={max_seq_len}", path=path)
    tokens = TokenStore.from_records(zip(ids_parts, label_parts))
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    store = MultimodalStore(tokens, offsets, np.asarray(starts, np.int64), np.asarray(paths, np.str_),
                            num_image_tokens, image_token_id)
    report.update(records=len(store), images=store.num_images, tokens=tokens.num_tokens,
                  image_tokens=store.num_images * num_image_tokens, trained_tokens=tokens.num_trained_tokens)
    return store, report


def load_llava_data(source: Union[str, Path], tokenizer: Any, *, image_dir: Union[str, Path, None] = None,
                    **kwargs) -> tuple[MultimodalStore, dict]:
    """:func:`build_llava_store` over a JSON/JSONL file (errors name ``file:line`` or ``file[index]``);
    ``image_dir`` defaults to the file's directory."""
    source = Path(source)
    if image_dir is None:
        image_dir = source.parent
    return build_llava_store(iter_records(source), tokenizer, image_dir=image_dir, path=str(source), **kwargs)


# --------------------------------------------------------------------------- batches
def _layout(store: MultimodalStore, records: np.ndarray, flat_starts: np.ndarray) -> dict[str, torch.Tensor]:
    """Images of ``records`` (in order), whose tokens begin at ``flat_starts`` in the flattened batch."""
    counts = store.image_offsets[records + 1] - store.image_offsets[records]
    entry = np.repeat(store.image_offsets[records], counts) + (
        np.arange(counts.sum(), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts))
    starts = np.repeat(flat_starts, counts) + store.image_starts[entry]
    return {"image_index": torch.from_numpy(entry.astype(np.int64)),
            "image_starts": torch.from_numpy(starts.astype(np.int64))}


def padded_image_layout(store: MultimodalStore, indices: np.ndarray, width: int) -> dict[str, torch.Tensor]:
    """For ``collate(store.tokens, indices, ...)`` with rows of ``width`` tokens: ``image_index`` [n] (entries of
    the store's image table, ``store.image_paths[image_index]``) and ``image_starts`` [n] (flat offsets over the
    batch's B * width tokens), in token order."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    return _layout(store, indices, np.arange(len(indices), dtype=np.int64) * width)


def packed_image_layout(store: MultimodalStore, plan, bins: np.ndarray, width: int) -> dict[str, torch.Tensor]:
    """The same for ``collate_packed(store.tokens, plan, bins, pad_id, width)``: each bin one row, its records in
    placement order. The plan must hold whole records (the store is already truncated to the bins' capacity),
    so no image is split across pieces."""
    bins = np.asarray(bins, np.int64).reshape(-1)
    sel = np.concatenate([np.arange(plan.bin_offsets[b], plan.bin_offsets[b + 1]) for b in bins]).astype(np.int64) \
        if len(bins) else np.zeros(0, np.int64)
    records, lens = plan.items[sel], plan.item_lengths[sel]
    if np.any(plan.item_starts[sel] != 0) or np.any(lens != store.lengths[records]):
        raise ValueError("the packing split or truncated a multimodal record; records must fit max_seq_len whole "
                         "(build the store with the same max_seq_len)")
    per_row = np.diff(plan.bin_offsets)[bins]  # items of each row
    row = np.repeat(np.arange(len(bins), dtype=np.int64), per_row)
    begin = np.concatenate([[0], np.cumsum(lens)])  # each item's start in the selected bins concatenated
    row_begin = begin[np.cumsum(per_row) - per_row]  # where each row's first item starts there
    return _layout(store, records, row * width + begin[:-1] - np.repeat(row_begin, per_row))
