"""Multimodal (LLaVA) records packed vs padded: packing efficiency and training tokens/s on CPU.

    python benchmarks/bench_multimodal_packing.py            # writes results/<date>-cpu-<cores>core-multimodal-packing.json
    python benchmarks/bench_multimodal_packing.py --smoke    # a few steps, nothing written

The data mimics LLaVA-1.5's instruction mix in miniature: images drawn locally (Pillow), each taking
`IMAGE_TOKENS` tokens of a small CLIP tower (image 64 px, patch 8: 64 patches); records are captions, short
single-turn questions, long multi-turn conversations and text-only chats, so their lengths spread from
~40 to ~480 tokens, as LLaVA's do (relative to its 576 image tokens). The decoder is the tiny preset
(byte tokenizer); the tower is frozen and its features are not cached, so every step runs it, as a first
epoch would.

Both arms are `fastsft train` runs over the same records and steps (full fine-tune of projector and
decoder):
    packed   data.packing true: best-fit-decreasing rows of max_seq_len tokens, attention kept within each
             record (cu_seqlens), image features spliced at their offsets in the packed row
    padded   data.packing false: one record a row, rows of similar length batched together
             (train.group_by_length), padded to the batch's longest; micro_batch_size chosen so that a
             micro-batch holds about as many real tokens as a packed one
Each arm's numbers come from its metrics.jsonl: packing_efficiency (real tokens / token slots of the
batches) and tokens_per_s (real tokens a second, the tower's forward included), averaged over the logged
windows after the first (warm-up) one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results  # noqa: E402

IMAGE_SIZE, PATCH = 64, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # "default" strategy: the CLS position dropped
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}
WORDS = ("the shape is drawn near the edge of a plain background and its colour is bright while the rest of "
         "the picture stays empty so a careful look tells where it is and how large it appears").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_data(d: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (d / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
        x, y, r = rng.randint(8, 56), rng.randint(8, 56), rng.randint(5, 12)
        ImageDraw.Draw(im).ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        im.save(d / "images" / f"{i}.png")
        kind = rng.random()
        if kind < 0.3:  # a caption
            conv = [("<image>\nDescribe the image.", f"a {colour} circle; " + _sentence(rng, 2, 8))]
        elif kind < 0.6:  # a short question
            conv = [("<image>\nWhat colour is the circle?", colour)]
        elif kind < 0.85:  # a long multi-turn conversation
            conv = [("<image>\n" + _sentence(rng, 4, 12) + "?", _sentence(rng, 8, 20))]
            conv += [(_sentence(rng, 3, 8) + "?", _sentence(rng, 6, 16)) for _ in range(rng.randint(1, 3))]
        else:  # text only
            conv = [(_sentence(rng, 3, 10) + "?", _sentence(rng, 4, 16))]
        turns = []
        for q, a in conv:
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rec = {"id": i, "conversations": turns}
        if "<image>" in conv[0][0]:
            rec["image"] = f"images/{i}.png"
        records.append(rec)
    path = d / "train.json"
    path.write_text(json.dumps(records))
    return path


def write_tower(d: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(d)
    return d


def run_arm(name: str, data: Path, tower: Path, out: Path, *, packing: bool, mbs: int, steps: int,
            max_seq_len: int) -> dict:
    from fastsft import config as config_mod
    from fastsft.train.loop import train

    cfg = config_mod.load(None, {
        "model.config": "tiny", "model.tokenizer": "byte", "model.vision_tower": str(tower),
        "model.image_token_id": "261", "data.datasets": [str(data)], "data.format": "llava",
        "data.max_seq_len": str(max_seq_len), "data.packing": str(packing).lower(), "data.eval_fraction": "0",
        "lora.enabled": "false", "train.max_steps": str(steps), "train.micro_batch_size": str(mbs),
        "train.lr": "1e-3", "eval.exact_match": "0", "output.log_every": "5", "output.progress": "false",
        "output.plot": "false", "output.dir": str(out / name), "output.checkpoint_minutes": "0"})
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    logs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in logs if r.get("kind") == "train"][1:]  # the first window warms up
    mean = lambda key: sum(r[key] for r in windows) / max(len(windows), 1)  # noqa: E731
    return {"arm": name, "packing": packing, "micro_batch_size": mbs, "steps": steps,
            "packing_efficiency": mean("packing_efficiency"), "tokens_per_s": mean("tokens_per_s"),
            "step_time_s": mean("step_time_s"), "final_loss": windows[-1]["loss"] if windows else None,
            "tokens": summary["tokens"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="packed rows a micro-batch")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.records, args.steps = 200, 6

    import numpy as np

    from fastsft.data import load_tokenizer
    from fastsft.multimodal.data import load_llava_data

    tmp = Path(tempfile.mkdtemp(prefix="fastsft-mm-packing-"))
    data = write_data(tmp / "data", args.records)
    tower = write_tower(tmp / "tower")
    store, _ = load_llava_data(data, load_tokenizer("byte"), image_token_id=261, num_image_tokens=IMAGE_TOKENS,
                               max_seq_len=args.max_seq_len)
    lengths = store.lengths
    # padded micro-batches of about the real tokens of a packed one (rows x max_seq_len x ~95% full)
    padded_mbs = max(1, round(args.rows * args.max_seq_len * 0.95 / float(lengths.mean())))
    rows = [run_arm("packed", data, tower, tmp / "runs", packing=True, mbs=args.rows, steps=args.steps,
                    max_seq_len=args.max_seq_len),
            run_arm("padded", data, tower, tmp / "runs", packing=False, mbs=padded_mbs, steps=args.steps,
                    max_seq_len=args.max_seq_len)]
    for r in rows:
        print(f"{r['arm']:>7}: micro-batch {r['micro_batch_size']:>2} rows, efficiency {r['packing_efficiency']:.1%}, "
              f"{r['tokens_per_s']:.0f} tokens/s, step {r['step_time_s'] * 1000:.0f} ms")
    print(f"packed / padded tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")
    result = {**_results.header("multimodal-packing", f"cpu-{os.cpu_count()}core"),
              "versions": _results.versions("torch", "transformers", "fastsft"),
              "setup": {"records": len(store), "images": int(store.num_images), "image_tokens": IMAGE_TOKENS,
                        "record_tokens": {"mean": float(lengths.mean()), "min": int(lengths.min()),
                                          "p50": float(np.median(lengths)), "max": int(lengths.max())},
                        "max_seq_len": args.max_seq_len, "model": "tiny preset + CLIP tower (64 px, patch 8, "
                        "hidden 128, 2 layers), full fine-tune", "steps": args.steps},
              "arms": rows,
              "packed_over_padded_tokens_per_s": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]}
    _results.write(result, args.out, smoke=args.smoke, suffix="multimodal-packing")


if __name__ == "__main__":
    main()
