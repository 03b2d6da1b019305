"""LLaVA JSON records -> MultimodalStore: placeholders, masks, image positions, bad images, truncation that
never keeps half an image, and where images sit in padded and packed batches."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastsft.data import ByteTokenizer, DataError
from fastsft.multimodal.data import (ImageLoader, MultimodalStore, build_llava_store, encode_llava_record,
                                     image_processor, load_llava_data, packed_image_layout, padded_image_layout)
from fastsft.packing import pack
from fastsft.train.batching import collate, collate_packed

IMG = 261
N = 4
TOK = ByteTokenizer()


@pytest.fixture
def image_dir(tmp_path):
    for k, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (30 + k, 28), c).save(tmp_path / f"{k}.png")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    (tmp_path / "adir.png").mkdir()
    return tmp_path


def _conv(*turns):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(turns)]


def _encode(record, image_dir, **kw):
    return encode_llava_record(record, TOK, image_dir=image_dir, image_token_id=IMG, num_image_tokens=N, **kw)


def _trained_text(ids, labels):
    return TOK.decode([i for i, lab in zip(ids, labels) if lab != -100])


def test_one_image_instruct(image_dir):
    ids, labels, paths, starts = _encode({"image": "0.png", "conversations": _conv("<image>\nWhat colour?", "red")},
                                         image_dir)
    assert paths == [str(image_dir / "0.png")] and len(starts) == 1
    s = starts[0]
    assert ids[s:s + N] == [IMG] * N and IMG not in ids[:s] + ids[s + N:]
    assert all(lab == -100 for lab in labels[: s + N])  # BOS, template, image, prompt: ignored
    assert _trained_text(ids, labels) == "red"  # (+ the trained <|im_end|>, a special token)
    assert labels.count(-100) == len(labels) - 4
    assert TOK.decode(ids[s + N:]).startswith("\nWhat colour?")


def test_several_images_and_their_order(image_dir):
    rec = {"image": ["1.png", "0.png", "2.png"],
           "conversations": _conv("<image><image> first", "a", "then <image>", "b")}
    ids, labels, paths, starts = _encode(rec, image_dir)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["1.png", "0.png", "2.png"]
    assert starts[1] == starts[0] + N  # two images back to back
    assert starts[2] > starts[1] + N
    for s in starts:
        assert ids[s:s + N] == [IMG] * N and all(lab == -100 for lab in labels[s:s + N])
    assert ids.count(IMG) == 3 * N
    assert _trained_text(ids, labels) == "ab"


def test_image_at_the_very_start(image_dir):
    rec = {"image": "0.png", "conversations": _conv("<image>", "a red square")}
    ids, labels, _, starts = _encode(rec, image_dir, mode="caption", add_bos=False)
    assert starts == [0] and ids[:N] == [IMG] * N
    assert labels[:N] == [-100] * N and _trained_text(ids, labels) == "a red square"
    assert ids[-1] == TOK.eos_id and labels[-1] == TOK.eos_id  # caption + EOS trained, nothing else
    ids_b, labels_b, _, starts_b = _encode(rec, image_dir, mode="caption")
    assert starts_b == [1] and ids_b[0] == TOK.bos_id and ids_b[1:] == ids


def test_caption_mode_drops_the_human_text(image_dir):
    rec = {"image": "0.png", "conversations": _conv("<image>\nDescribe it please.", "red")}
    ids, labels, _, starts = _encode(rec, image_dir, mode="caption")
    assert "Describe" not in TOK.decode(ids)
    assert ids == [TOK.bos_id] + [IMG] * N + list(b"red") + [TOK.eos_id]


def test_missing_placeholder_goes_before_the_first_human_turn(image_dir):
    rec = {"image": "0.png", "conversations": _conv("What colour?", "red")}
    ids, labels, _, starts = _encode(rec, image_dir)
    explicit = _encode({"image": "0.png", "conversations": _conv("<image>\nWhat colour?", "red")}, image_dir)
    assert (ids, labels, starts) == (explicit[0], explicit[1], explicit[3])


def test_records_without_images_train_as_text(image_dir):
    ids, labels, paths, starts = _encode({"conversations": _conv("hi", "hello")}, image_dir)
    assert paths == [] and starts == [] and IMG not in ids
    assert _trained_text(ids, labels) == "hello"


@pytest.mark.parametrize("record, reason", [
    ({"image": "nope.png", "conversations": _conv("<image>", "x")}, "image 'nope.png': not found"),
    ({"image": "garbage.png", "conversations": _conv("<image>", "x")},
     "image 'garbage.png': cannot be decoded: UnidentifiedImageError"),
    ({"image": "truncated.jpg", "conversations": _conv("<image>", "x")}, "image 'truncated.jpg': cannot be decoded"),
    ({"image": "adir.png", "conversations": _conv("<image>", "x")}, "image 'adir.png': is a directory"),
    ({"image": ["0.png"], "conversations": _conv("<image> <image>", "x")}, "2 <image> placeholder(s) for 1 image"),
    ({"conversations": _conv("<image>", "x")}, "1 <image> placeholder(s) for 0 image"),
    ({"image": "0.png", "conversations": _conv("<image>", "look: <image>")}, "<image> in an assistant turn"),
    ({"image": 3, "conversations": _conv("<image>", "x")}, "field 'image' must be a non-empty string"),
    ({"image": "0.png", "conversations": _conv("<image>")}, "no assistant turn"),
])
def test_bad_records_name_file_and_line(image_dir, record, reason):
    good = {"image": "0.png", "conversations": _conv("<image>", "fine")}
    path = image_dir / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        load_llava_data(path, TOK, image_token_id=IMG, num_image_tokens=N, max_seq_len=128)
    assert str(e.value).startswith(f"{path}:2: ")
    assert reason in str(e.value)
    store, report = load_llava_data(path, TOK, image_token_id=IMG, num_image_tokens=N, max_seq_len=128,
                                    skip_bad_records=True)
    assert len(store) == 1 and report["bad_skipped"] == 1 and report["bad_examples"][0].startswith(f"{path}:2: ")


def test_json_list_records_are_located_by_index(image_dir):
    path = image_dir / "data.json"
    path.write_text(json.dumps([{"image": "0.png", "conversations": _conv("<image>", "a")},
                                {"image": "nope.png", "conversations": _conv("<image>", "b")}]))
    with pytest.raises(DataError, match=r"data\.json\[1\]: image 'nope.png': not found"):
        load_llava_data(path, TOK, image_token_id=IMG, num_image_tokens=N, max_seq_len=128)


def test_truncation_never_keeps_half_an_image(image_dir):
    rec = {"image": ["0.png", "1.png"], "conversations": _conv("<image> one", "first", "<image> two", "second")}
    ids, labels, _, starts = _encode(rec, image_dir)
    second = starts[1]

    def build(max_seq_len, **kw):
        return build_llava_store([rec], TOK, image_dir=image_dir, image_token_id=IMG, num_image_tokens=N,
                                 max_seq_len=max_seq_len, **kw)

    for cut in range(second + 1, second + N):  # inside the second image's tokens: dropped, or refused
        with pytest.raises(DataError, match="no usable records: 0 bad, 1 cut inside an image"):
            build(cut)
        with pytest.raises(DataError, match=rf"<records>\[0\]: truncated to max_seq_len={cut} inside image 1's"):
            build(cut, truncation="error")
    kept = build_llava_store([rec, {"conversations": _conv("q", "a")}], TOK, image_dir=image_dir,
                             image_token_id=IMG, num_image_tokens=N, max_seq_len=second + 2)[1]
    assert kept["dropped_image_cut"] == 1 and kept["records"] == 1
    # a cut right before the image, or right after it, keeps whole images only
    for cut, n_images in ((second, 1), (second + N, 2)):
        store, report = build(cut)
        assert report["truncated"] == 1 and store.num_images == n_images
        assert store.tokens.num_tokens == cut
        store.check()
        assert _trained_text(*store.tokens[0]).startswith("first")
    # a cut before any trained token drops the record as text records are dropped
    with pytest.raises(DataError, match="1 without trained tokens"):
        build(starts[0] + N + 2)


def _store(image_dir, records=None):
    records = records or [
        {"image": ["0.png", "1.png"], "conversations": _conv("<image><image>?", "two")},
        {"conversations": _conv("text only", "yes")},
        {"image": "2.png", "conversations": _conv("<image>", "blue")},
        {"image": "0.png", "conversations": _conv("again <image>", "red")},
    ]
    return build_llava_store(records, TOK, image_dir=image_dir, image_token_id=IMG, num_image_tokens=N,
                             max_seq_len=128)[0]


def test_store_select_and_save(image_dir, tmp_path):
    store = _store(image_dir)
    store.check()
    assert list(store.images_per_record()) == [2, 0, 1, 1]
    sub = store.select([3, 1, 0, 3])
    sub.check()
    assert [len(sub.record_images(i)) for i in range(4)] == [1, 0, 2, 1]
    assert sub.record_images(0) == store.record_images(3) == sub.record_images(3)
    assert sub.record_images(2) == store.record_images(0)
    sub.save(tmp_path / "mm")
    back = MultimodalStore.load(tmp_path / "mm")
    assert back.tokens == sub.tokens and np.array_equal(back.image_paths, sub.image_paths)
    assert np.array_equal(back.image_offsets, sub.image_offsets) and np.array_equal(back.image_starts, sub.image_starts)
    assert (back.num_image_tokens, back.image_token_id) == (N, IMG)


def _check_layout(store, batch, layout, records_in_order):
    flat = batch["input_ids"].reshape(-1)
    expected = [p for r in records_in_order for p, _ in store.record_images(int(r))]
    assert list(store.image_paths[layout["image_index"].numpy()]) == expected
    assert layout["image_starts"].tolist() == sorted(layout["image_starts"].tolist())  # token order
    covered = torch.zeros_like(flat, dtype=torch.bool)
    for s in layout["image_starts"].tolist():
        assert bool((flat[s:s + N] == IMG).all())
        covered[s:s + N] = True
    assert torch.equal(covered, flat == IMG)  # every placeholder is covered by exactly the listed images
    assert bool((batch["targets"].reshape(-1)[covered] == -100).all())


def test_padded_layout(image_dir):
    store = _store(image_dir)
    idx = np.array([2, 0, 1, 3])
    batch = collate(store.tokens, idx, pad_id=256)
    _check_layout(store, batch, padded_image_layout(store, idx, batch["input_ids"].shape[1]), idx)


def test_packed_layout(image_dir):
    store = _store(image_dir).select([0, 1, 2, 3, 2, 0, 3, 1, 0])
    cap = int(store.lengths.max()) + 20
    plan = pack(store.lengths, cap, strategy="bfd")
    assert plan.num_bins >= 3  # several rows, several records a row
    bins = np.array([2, 0, 1])[: plan.num_bins]
    batch = collate_packed(store.tokens, plan, bins, pad_id=256, width=cap)
    layout = packed_image_layout(store, plan, bins, cap)
    order = np.concatenate([plan.items[plan.bin_offsets[b]:plan.bin_offsets[b + 1]] for b in bins])
    _check_layout(store, batch, layout, order)
    with pytest.raises(ValueError, match="split or truncated a multimodal record"):
        cut = pack(store.lengths, cap - 25, strategy="bfd", overflow="split")
        packed_image_layout(store, cut, np.arange(cut.num_bins), cap - 25)


def test_image_loader_uses_the_processor(image_dir):
    proc = image_processor({"model_type": "clip_vision_model", "image_size": 28, "patch_size": 14})
    loader = ImageLoader(proc, cache_size=2)
    px = loader([str(image_dir / "0.png"), str(image_dir / "2.png")])
    assert px.shape == (2, 3, 28, 28)
    red = (1.0 - 0.48145466) / 0.26862954  # CLIP's normalisation of a full red channel
    assert torch.allclose(px[0, 0], torch.full((28, 28), red), atol=1e-4)
    siglip = image_processor({"model_type": "siglip_vision_model", "image_size": 28, "patch_size": 14})
    assert torch.allclose(ImageLoader(siglip)([str(image_dir / "0.png")])[0, 0], torch.ones(28, 28), atol=1e-4)
    with pytest.raises(DataError, match="truncated.jpg'?: cannot be decoded"):
        loader([str(image_dir / "truncated.jpg")])
