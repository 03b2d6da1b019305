"""The embedded vision-language demo's data: images of coloured shapes drawn here, LLaVA JSON about them.

Nothing comes from outside. ``write_demo_data`` draws small PNGs with Pillow -- one to three shapes (circle,
square, triangle, cross) in five colours, each in its own quadrant, on a dark background of random
brightness -- and writes the two LLaVA stages' files:

    captions.json  stage 1 (projector alignment): "<image>\\nDescribe the image." -> "a red circle at the top left",
                   "a red circle and a blue square", "a red circle, a blue cross and a green square"
    train.json     stage 2 (instructions): questions with short exact answers about the train images --
                   colour ("What colour is the shape?" -> "red"), shape ("What shape is it?" -> "circle"),
                   position ("Where is the shape?" -> "top left"), count ("How many shapes are there?" -> "2")
                   -- and a few text-only records ("What is 2+3?" -> "5") so the model still answers without
                   an image
    eval.json      the same four question types, one per image, on held-out images (other files, other
                   pixels) with balanced answers: exact match against ``chance`` / ``majority`` says whether
                   the model looks at the image

Each record carries ``"type"`` (caption, colour, shape, position, count, text) beside the LLaVA fields.
The vision tower is :func:`demo_vision_config`'s tiny CLIP ViT (32 px images, 8 px patches: 16 image tokens,
hidden 64, 2 layers), built with random weights (``vision_tower_from_config``) and never trained; the
images are drawn at 32 px (4x supersampled, so edges are antialiased) and fed to it as they are.

Why a random tower works: a ViT's patch embedding is a linear map of each patch's pixels (here 192 numbers
to 64), and a random linear map to a lower dimension keeps most distances between inputs (a
Johnson-Lindenstrauss projection); the layer after it is residual, so the selected layer (-2: the output of
the first of two layers) is that projection plus a random but fixed mixing. Colour is then a direction in a
patch's features, a shape's outline a pattern over the patches it covers, and position *which* of the 16
image tokens carry the shape -- the decoder sees every patch as its own token. Only the projector (stage 1)
and the decoder (stage 2) have to learn to read these features. tests/multimodal/test_demo.py checks it
with ridge-regression probes fitted on 200 images and scored on 200 others (tower seed 1, the trainer's
for seed 0): from the patch-mean features colour 0.99 (chance 0.20), shape 0.86 (0.25; 0.92 from the
per-patch features), count 0.79 (0.33); position 0.99 from the per-patch features (0.25) -- a mean over
patches cannot tell symmetric quadrants apart (0.24), which is why the decoder gets the patches, not their
mean. Tower seeds 2..6 give colour >= 0.96, shape >= 0.80, count >= 0.69, position >= 0.99.

Shapes are large on purpose (2 x 2 patches): a first layout with shapes small enough never to overlap at
left/right/top/bottom probed at ~0.7 for shape (six colours then, 100 training images); quadrants
allow shapes twice that size. Position answers are therefore quadrants, two short words. Token budget
with the byte tokenizer (one token per character, ChatML) and 16 image tokens: questions <= 70 tokens,
captions <= 76 in stage 1's caption mode (<= 116 as a ChatML conversation), all within max_seq_len 128.
The tower has 81K parameters; it embeds 64 images in ~5 ms on 2 CPU cores. Writing the default data
(2,200 PNGs, 6,400 records) takes ~1 s.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ANSWERS", "COLOURS", "IMAGE_TOKEN_ID", "POSITIONS", "QUESTIONS", "SHAPES", "caption",
           "demo_image_processor", "demo_vision_config", "draw_scene", "random_scene", "write_demo_data"]

# colour name -> RGB (each image's shape is jittered by up to +-20 per channel)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (240, 220, 30),
           "purple": (150, 50, 200)}
SHAPES = ("circle", "square", "triangle", "cross")
# quadrant name -> its centre as a fraction of the image side
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75)}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
             "position": "Where is the shape?", "count": "How many shapes are there?"}
CAPTION_PROMPT = "Describe the image."
MAX_SHAPES = 3
ANSWERS = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS),
           "count": [str(n) for n in range(1, MAX_SHAPES + 1)]}
IMAGE_TOKEN_ID = 261  # unused by the byte tokenizer (ids 261..271)

_IMAGE_SIZE = 32
_PATCH_SIZE = 8
_SUPERSAMPLE = 4            # shapes are drawn this much larger, then downsampled (antialiased edges)
_RADIUS = (0.15, 0.21)      # half a shape's width, as a fraction of the image side
_JITTER = 0.02              # centre offset, fraction of the side: quadrants never overlap
_BACKGROUND = (0, 60)       # grey level of the background
_COLOUR_JITTER = 20
_TRAIN_KINDS = (0.5, 0.25, 0.25)  # share of 1-, 2- and 3-shape images in the train pool


# --------------------------------------------------------------------------- the tower and its processor
def demo_vision_config():
    """A tiny CLIP vision tower's config: 32 x 32 images, 8 x 8 patches (16 image tokens under "default"),
    hidden 64, 2 layers of 4 heads, MLP 128 (81K parameters)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=64)


def demo_image_processor():
    """The CLIP image processor for :func:`demo_vision_config` (shortest edge resized and centre-cropped to 32,
    CLIP's mean/std), built from arguments -- what the trainer builds for ``model.vision_tower: demo``."""
    from .data import image_processor

    return image_processor(demo_vision_config())


# --------------------------------------------------------------------------- scenes and images
def random_scene(rng: np.random.Generator, n_shapes: int = 1) -> dict:
    """A random scene: ``n_shapes`` shapes, each in its own quadrant, in the order drawn (reading order of
    the quadrants), with its jitter (size, offset, exact colour, background) fixed by ``rng``."""
    if not 1 <= n_shapes <= MAX_SHAPES:
        raise ValueError(f"n_shapes must be 1..{MAX_SHAPES}, got {n_shapes}")
    quadrants = sorted(rng.choice(len(POSITIONS), size=n_shapes, replace=False).tolist())
    shapes = []
    for q in quadrants:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        rgb = [int(np.clip(v + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1), 0, 255)) for v in COLOURS[colour]]
        shapes.append({"colour": colour, "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                       "position": list(POSITIONS)[q], "rgb": rgb,
                       "radius": float(rng.uniform(*_RADIUS)),
                       "offset": [float(rng.uniform(-_JITTER, _JITTER)), float(rng.uniform(-_JITTER, _JITTER))]})
    return {"background": int(rng.integers(_BACKGROUND[0], _BACKGROUND[1] + 1)), "shapes": shapes}


def draw_scene(scene: dict, size: int = _IMAGE_SIZE):
    """The scene as a ``size`` x ``size`` RGB PIL image."""
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    bg = scene["background"]
    im = Image.new("RGB", (big, big), (bg, bg, bg))
    draw = ImageDraw.Draw(im)
    for s in scene["shapes"]:
        fx, fy = POSITIONS[s["position"]]
        cx, cy = (fx + s["offset"][0]) * big, (fy + s["offset"][1]) * big
        r, fill = s["radius"] * big, tuple(s["rgb"])
        if s["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif s["shape"] == "cross":
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {s['shape']!r}")
    return im.resize((size, size), Image.LANCZOS)


def caption(scene: dict) -> str:
    """"a red circle at the top left" (one shape), "a red circle and a blue square", "a red circle, a blue
    square and a green cross"."""
    items = [f"a {s['colour']} {s['shape']}" for s in scene["shapes"]]
    if len(items) == 1:
        return f"{items[0]} at the {scene['shapes'][0]['position']}"
    return ", ".join(items[:-1]) + " and " + items[-1]


def _answer(scene: dict, kind: str) -> str:
    if kind == "count":
        return str(len(scene["shapes"]))
    (s,) = scene["shapes"]  # the other questions are asked about one-shape images only
    return s[kind]


def _record(rid: str, image: str | None, prompt: str, answer: str, kind: str) -> dict:
    rec: dict[str, Any] = {"id": rid, "type": kind}
    if image is not None:
        rec["image"] = image
        prompt = "<image>\n" + prompt
    rec["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return rec


def _write_images(scenes: list[dict], out_dir: Path, prefix: str, taken: set) -> list[str]:
    """Draws and saves the scenes as ``images/<prefix><k>.png``; a scene whose pixels equal an image already in
    ``taken`` (pixel hashes) is refused, so held-out images are new pixels, not only new files."""
    paths = []
    for k, scene in enumerate(scenes):
        im = draw_scene(scene)
        digest = hashlib.sha1(im.tobytes()).hexdigest()
        if digest in taken:  # jitter in floats makes it all but impossible; held-out must stay held out
            raise RuntimeError(f"demo image {prefix}{k} repeats an earlier image's pixels")
        taken.add(digest)
        rel = f"images/{prefix}{k:05d}.png"
        im.save(out_dir / rel, format="PNG")
        paths.append(rel)
    return paths


def _dump(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------- the data set
def write_demo_data(out_dir: str | Path, *, seed: int = 0, n_caption: int = 2000, n_train: int = 4000,
                    n_eval: int = 200, n_text: int = 200, n_train_images: int = 2000) -> dict:
    """Draws the demo's images under ``out_dir/images/`` and writes ``captions.json`` (``n_caption`` records),
    ``train.json`` (``n_train`` image questions + ``n_text`` text-only records, shuffled) and ``eval.json``
    (``n_eval`` questions, one per held-out image, the four types in turn, answers balanced) in LLaVA format
    (paths relative to out_dir: ``load_llava_data``'s default image_dir). Captions and train questions share
    a pool of ``n_train_images`` images (half with one shape, a quarter each with two and three); colour,
    shape and position are asked about one-shape images, count about any (1, 2 and 3 equally often).
    Deterministic for a seed (same JSON, same PNG bytes).

    Returns ``{"dir", "images", "captions", "train", "eval"}`` (paths as str), ``"sizes"`` (records and images
    of each file), ``"answers"`` (each question type's possible answers), ``"chance"`` (1 / their number),
    ``"majority"`` (the most common answer's share of each type on eval) and ``"eval_types"`` (each eval
    record's type, in file order; also its record's ``"type"``)."""
    for name, v in (("n_caption", n_caption), ("n_train", n_train), ("n_eval", n_eval), ("n_text", n_text)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if n_train_images < 1 and (n_caption or n_train):
        raise ValueError(f"n_train_images must be >= 1 for captions or train questions, got {n_train_images}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pool_rng, eval_rng, rec_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    kinds = list(ANSWERS)

    # the train pool: n shapes by _TRAIN_KINDS, at least one image of each kind when the pool allows
    counts = np.floor(np.asarray(_TRAIN_KINDS) * n_train_images).astype(int)
    counts[0] += n_train_images - counts.sum()
    pool_n = np.repeat(np.arange(1, MAX_SHAPES + 1), counts)
    pool_rng.shuffle(pool_n)
    pool = [random_scene(pool_rng, int(n)) for n in pool_n]
    taken: set = set()
    pool_paths = _write_images(pool, out, "train_", taken)
    by_n = {n: np.flatnonzero(pool_n == n) for n in range(1, MAX_SHAPES + 1)}

    captions = [_record(f"cap{k}", pool_paths[k % len(pool)], CAPTION_PROMPT, caption(pool[k % len(pool)]),
                        "caption") for k in range(n_caption)]

    train = []
    for k in range(n_train):
        kind = kinds[int(rec_rng.integers(len(kinds)))]
        n = int(rec_rng.integers(1, MAX_SHAPES + 1)) if kind == "count" else 1
        choices = by_n[n] if len(by_n[n]) else np.arange(len(pool))  # a tiny pool may lack a kind
        i = int(choices[int(rec_rng.integers(len(choices)))])
        if kind != "count" and len(pool[i]["shapes"]) != 1:
            kind = "count"
        train.append(_record(f"qa{k}", pool_paths[i], QUESTIONS[kind], _answer(pool[i], kind), kind))
    for k in range(n_text):
        a, b = (int(x) for x in rec_rng.integers(0, 5, size=2))
        train.append(_record(f"text{k}", None, f"What is {a}+{b}?", str(a + b), "text"))
    rec_rng.shuffle(train)

    # held-out images: a separate stream, each asked one question; answers balanced by cycling them
    eval_types = [kinds[k % len(kinds)] for k in range(n_eval)]
    scenes = []
    for k, kind in enumerate(eval_types):
        turn = k // len(kinds)
        if kind == "count":
            scene = random_scene(eval_rng, 1 + turn % MAX_SHAPES)
        else:
            scene = random_scene(eval_rng, 1)
            s = scene["shapes"][0]
            want = ANSWERS[kind][turn % len(ANSWERS[kind])]
            s[kind] = want  # a position too: the jitter is relative to the quadrant's centre
            if kind == "colour":
                s["rgb"] = [int(np.clip(v + eval_rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1), 0, 255))
                            for v in COLOURS[want]]
        scenes.append(scene)
    eval_paths = _write_images(scenes, out, "eval_", taken)
    evals = [_record(f"eval{k}", p, QUESTIONS[kind], _answer(sc, kind), kind)
             for k, (p, sc, kind) in enumerate(zip(eval_paths, scenes, eval_types))]

    paths = {"captions": out / "captions.json", "train": out / "train.json", "eval": out / "eval.json"}
    _dump(captions, paths["captions"])
    _dump(train, paths["train"])
    _dump(evals, paths["eval"])

    majority = {}
    for kind in kinds:
        answers = [r["conversations"][1]["value"] for r in evals if r["type"] == kind]
        if answers:
            majority[kind] = max(answers.count(a) for a in set(answers)) / len(answers)
    return {"dir": str(out), "images": str(out / "images"), **{k: str(v) for k, v in paths.items()},
            "sizes": {"captions": len(captions), "train": len(train), "train_text_only": n_text,
                      "eval": len(evals), "train_images": len(pool), "eval_images": len(scenes)},
            "answers": {k: list(v) for k, v in ANSWERS.items()},
            "chance": {k: 1.0 / len(v) for k, v in ANSWERS.items()},
            "majority": majority, "eval_types": eval_types}
