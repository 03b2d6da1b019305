"""The embedded multimodal demo's data: deterministic, valid LLaVA JSON that fits 128 tokens with the byte
tokenizer, held-out eval images, and a frozen random tower whose features a linear probe reads colour,
shape and position from."""

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsft.data.tokenizer import load_tokenizer
from fastsft.model import ModelConfig, build_model
from fastsft.multimodal import MultimodalCausalLM, num_image_tokens, vision_tower_from_config
from fastsft.multimodal.data import ImageLoader, load_llava_data
from fastsft.multimodal.demo import (ANSWERS, IMAGE_TOKEN_ID, demo_image_processor, demo_vision_config, draw_scene,
                                     random_scene, write_demo_data)

SMALL = {"n_caption": 40, "n_train": 80, "n_eval": 24, "n_text": 8, "n_train_images": 30}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out, seed=3, **SMALL)


def _load(path, **kw):
    return load_llava_data(path, load_tokenizer("byte"), image_token_id=IMAGE_TOKEN_ID, num_image_tokens=16,
                           max_seq_len=128, **kw)


def _json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_config_and_processor():
    vc = demo_vision_config()
    assert num_image_tokens(vc, "default") == 16
    proc = demo_image_processor()
    assert proc.crop_size == {"height": 32, "width": 32}
    np.testing.assert_allclose(proc.image_mean, [0.48145466, 0.4578275, 0.40821073])
    im = draw_scene(random_scene(np.random.default_rng(0), 2))
    assert im.size == (32, 32) and im.mode == "RGB"
    assert tuple(proc(images=[im], return_tensors="pt")["pixel_values"].shape) == (1, 3, 32, 32)


def test_images_load_as_the_trainer_loads_them(demo):
    out, info = demo
    record = _json(info["eval"])[0]
    pixels = ImageLoader(demo_image_processor())([str(out / record["image"])])
    assert tuple(pixels.shape) == (1, 3, 32, 32) and pixels.std() > 0.1


def test_deterministic_for_a_seed(tmp_path, demo):
    out, info = demo
    again = write_demo_data(tmp_path / "again", seed=3, **SMALL)
    assert _tree(out) == _tree(tmp_path / "again")  # the same JSON and the same PNG bytes
    assert {k: v for k, v in again.items() if k not in ("dir", "images", "captions", "train", "eval")} == \
        {k: v for k, v in info.items() if k not in ("dir", "images", "captions", "train", "eval")}
    other = write_demo_data(tmp_path / "other", seed=4, **SMALL)
    assert _json(other["train"]) != _json(info["train"])


def test_llava_files_load_whole(demo):
    _, info = demo
    assert info["sizes"] == {"captions": 40, "train": 88, "train_text_only": 8, "eval": 24, "train_images": 30,
                             "eval_images": 24}
    for name, modes in (("captions", ("caption", "instruct")), ("train", ("instruct",)), ("eval", ("instruct",))):
        records = _json(info[name])
        assert len(records) == info["sizes"][name]
        for mode in modes:
            store, report = _load(info[name], mode=mode)
            assert len(store) == len(records)  # nothing dropped, nothing cut
            assert report["truncated"] == report["dropped_image_cut"] == report["bad_skipped"] == 0
            store.check()
            assert store.lengths.max() <= (100 if name != "captions" or mode == "caption" else 128)
        for r in records:
            assert r["conversations"][0]["from"] == "human" and r["conversations"][1]["from"] == "gpt"
            if r["type"] in ANSWERS:
                assert r["conversations"][1]["value"] in ANSWERS[r["type"]]
    train = _json(info["train"])
    assert Counter(r["type"] for r in train)["text"] == 8 and all("image" not in r for r in train
                                                                  if r["type"] == "text")


def test_eval_is_held_out_and_balanced(demo):
    out, info = demo
    recs = {n: _json(info[n]) for n in ("captions", "train", "eval")}
    train_imgs = {r["image"] for n in ("captions", "train") for r in recs[n] if "image" in r}
    eval_imgs = [r["image"] for r in recs["eval"]]
    assert len(set(eval_imgs)) == len(eval_imgs) and not train_imgs & set(eval_imgs)

    def digest(rel):
        from PIL import Image

        with Image.open(out / rel) as im:
            return hashlib.sha1(im.convert("RGB").tobytes()).hexdigest()

    assert not {digest(p) for p in train_imgs} & {digest(p) for p in eval_imgs}  # other pixels too
    assert info["eval_types"] == [r["type"] for r in recs["eval"]]
    assert Counter(info["eval_types"]) == {"colour": 6, "shape": 6, "position": 6, "count": 6}
    assert info["chance"] == {"colour": 0.2, "shape": 0.25, "position": 0.25, "count": 1 / 3}
    for kind, rate in info["majority"].items():  # answers cycle: the majority answer is about chance
        assert rate <= info["chance"][kind] + 0.2


# --------------------------------------------------------------------------- the random tower's features
def _ridge_accuracy(x_train, y_train, x_test, y_test, classes, lam=1e-2):
    """A one-vs-rest ridge regression probe (standardised features + bias) -> test accuracy."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    def design(x):
        return torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    a = design(x_train)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1], dtype=a.dtype),
                           a.T @ torch.nn.functional.one_hot(y_train, classes).to(a.dtype))
    return ((design(x_test) @ w).argmax(1) == y_test).double().mean().item()


def test_random_tower_features_carry_colour_shape_and_position():
    vc = demo_vision_config()
    tower = vision_tower_from_config(vc, seed=1)  # the trainer's tower for seed 0
    lm = build_model(ModelConfig(model_type="llama", vocab_size=272, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=128), seed=0)
    model = MultimodalCausalLM(tower, lm, image_token_id=IMAGE_TOKEN_ID)  # layer -2, "default", as the demo
    rng = np.random.default_rng(123)
    n = 400  # one-shape images for colour, shape and position; then 1, 2, 3 shapes in turn for count
    scenes = [random_scene(rng, 1) for _ in range(n)] + [random_scene(rng, 1 + k % 3) for k in range(n)]
    pixels = demo_image_processor()(images=[draw_scene(s) for s in scenes], return_tensors="pt")["pixel_values"]

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model.vision_features(pixels[:64])  # warm up
    t = time.perf_counter()
    feats = model.vision_features(pixels[:64])
    forward_s = time.perf_counter() - t
    assert feats.shape == (64, 16, 64)
    feats = model.vision_features(pixels).double()
    pooled, flat = feats.mean(1), feats.flatten(1)

    h = n // 2  # each probe fitted on the first half of its images, scored on the other
    acc = {}
    for kind in ("colour", "shape", "position", "count"):
        part = slice(0, n) if kind != "count" else slice(n, 2 * n)
        y = torch.tensor([ANSWERS[kind].index(str(len(s["shapes"])) if kind == "count" else s["shapes"][0][kind])
                          for s in scenes[part]])
        for name, x in (("mean", pooled[part]), ("patches", flat[part])):
            acc[f"{kind}/{name}"] = _ridge_accuracy(x[:h], y[:h], x[h:], y[h:], len(ANSWERS[kind]))
    chance = {k: 1 / len(v) for k, v in ANSWERS.items()}
    print(f"probe accuracy {({k: round(v, 2) for k, v in acc.items()})}, chance {chance}, "
          f"forward of 64 images {forward_s * 1e3:.0f} ms")
    assert acc["colour/mean"] > 3 * chance["colour"]
    assert acc["shape/mean"] > 2.5 * chance["shape"]
    # a mean over patches cannot tell the quadrants apart; the decoder gets each patch as its own token
    assert acc["position/patches"] > 3 * chance["position"]
    assert acc["count/mean"] > 1.6 * chance["count"]  # the weakest: 0.69..0.79 over tower seeds
    assert forward_s < 0.5  # ~0.01 s; the bound leaves room for a loaded machine


def test_llava_demo_runs_both_stages(tmp_path):
    """`fastsft train --recipe llava-demo` in miniature: stage 1 trains the projector, stage 2 starts from its
    LLaVA directory, and the final model/ is a LLaVA directory transformers loads. (The full demo -- about 3
    minutes on 2 cores, exact match far above chance -- is recorded in benchmarks/results/*-llava-demo.json.)"""
    from transformers import LlavaForConditionalGeneration

    from fastsft.multimodal.demo_run import run_demo

    result = run_demo({"output.dir": str(tmp_path / "demo"), "output.progress": "false", "train.max_steps": "6",
                       "eval.exact_match": "8"}, sizes={"n_caption": 64, "n_train": 96, "n_eval": 16, "n_text": 8,
                                                        "n_train_images": 64})
    assert result["stage1"]["eval_after"]["eval_loss"] < result["stage1"]["eval_before"]["eval_loss"]
    assert "exact_match" in result["stage2"]["eval_after"] and 0.2 < result["chance"] < 0.35
    assert (tmp_path / "demo" / "demo.json").is_file()
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "demo" / "stage2" / "model")
