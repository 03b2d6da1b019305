"""``fastsft train --recipe llava-demo``: both LLaVA stages on images drawn here, nothing from outside.

    1. write the demo data (:func:`fastsft.multimodal.demo.write_demo_data`) into OUT/data
    2. stage 1 (recipes/llava-demo-stage1.yaml): the projector aligns a tiny random CLIP tower to the tiny
       random decoder on the captions -> OUT/stage1/model, a LLaVA directory
    3. stage 2 (recipes/llava-demo-stage2.yaml): from that directory, projector + decoder on the questions,
       exact match on held-out images -> OUT/stage2, and a line per question type against chance

OUT is ``output.dir`` (default runs/llava-demo-<time>); other ``--section.key`` overrides apply to both stages.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from fastsft import config as config_mod

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run_demo(overrides: dict, *, sizes: dict | None = None) -> dict:
    """Both stages; ``sizes``: write_demo_data's record counts (tests use small ones)."""
    import os
    import platform
    import sys
    import time

    import torch
    import transformers

    from fastsft import __version__
    from fastsft.train.loop import train

    from .demo import write_demo_data

    overrides = dict(overrides)
    out = Path(overrides.pop("output.dir", None) or f"runs/llava-demo-{datetime.now():%Y%m%d-%H%M%S}")
    started = time.time()
    data = write_demo_data(out / "data", seed=int(overrides.get("train.seed", 0)), **(sizes or {}))
    print(f"llava-demo: {data['sizes']} records and images drawn into {out / 'data'}")

    print("llava-demo: stage 1 -- the projector learns to caption")
    stage1 = config_mod.load(RECIPES / "llava-demo-stage1.yaml",
                             {"data.datasets": [str(data["captions"])], "output.dir": str(out / "stage1"),
                              **overrides})
    s1 = train(stage1)

    print("llava-demo: stage 2 -- projector and decoder learn to answer questions about the images")
    stage2 = config_mod.load(RECIPES / "llava-demo-stage2.yaml",
                             {"model.path": str(out / "stage1" / "model"), "data.datasets": [str(data["train"])],
                              "data.eval_datasets": [str(data["eval"])], "output.dir": str(out / "stage2"),
                              **overrides})
    s2 = train(stage2)
    before, after = s2["eval_before"].get("exact_match", 0.0), s2["eval_after"].get("exact_match", 0.0)
    chance = sum(data["chance"][t] for t in data["eval_types"]) / len(data["eval_types"])
    types = ", ".join(f"{t} {data['chance'][t]:.0%}" for t in dict.fromkeys(data["eval_types"]))
    print(f"llava-demo: held-out exact match {before:.1%} -> {after:.1%} (chance {chance:.1%}, the mean over the "
          f"question types {types}); "
          f"stage 1 caption loss {s1['eval_before'].get('eval_loss', float('nan')):.3f} -> "
          f"{s1['eval_after'].get('eval_loss', float('nan')):.3f}; model: {out / 'stage2' / 'model'}")
    result = {"benchmark": "llava-demo", "device": f"cpu-{os.cpu_count()}core", "date": time.strftime("%Y-%m-%d"),
              "command": "fastsft train --recipe llava-demo " + " ".join(sys.argv[4:]),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "fastsft": __version__},
              "wall_s": time.time() - started, "sizes": data["sizes"],
              "stage1": {k: s1[k] for k in ("eval_before", "eval_after", "seconds")},
              "stage2": {k: s2[k] for k in ("eval_before", "eval_after", "seconds", "samples")},
              "chance": chance, "chance_by_type": data["chance"]}
    (out / "demo.json").write_text(json.dumps(result, indent=1, default=str))
    return result
