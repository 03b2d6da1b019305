"""``fastsft train`` on LLaVA data: a transformers-saved Llava trains packed and its export loads back into
transformers with fastsft's logits; a random decoder + vision tower run resumes bitwise after a kill; the
images of padded and packed batches reach the model; the config refuses what multimodal runs do not do."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastsft import config as config_mod
from fastsft.config import ConfigError
from fastsft.data import ByteTokenizer

from helpers_mm import IMAGE_TOKEN, tiny_llava

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230), "yellow": (240, 230, 30)}


def _write_data(d, n=48, seed=0, image_size=28):
    """LLaVA records: a coloured square and its colour; every 8th record text-only, every 5th two images."""
    rng = np.random.default_rng(seed)
    (d / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        c = names[int(rng.integers(len(names)))]
        im = Image.new("RGB", (image_size, image_size), (250, 250, 250))
        x = int(rng.integers(0, image_size // 2))
        im.paste(COLOURS[c], (x, x, x + image_size // 2, x + image_size // 2))
        im.save(d / "images" / f"{i}.png")
        if i % 8 == 7:
            records.append({"id": i, "conversations": [{"from": "human", "value": "Say hi."},
                                                       {"from": "gpt", "value": "hi"}]})
        elif i % 5 == 4:
            records.append({"id": i, "image": [f"images/{i}.png", f"images/{i - 1}.png"],
                            "conversations": [{"from": "human", "value": "<image> and <image>: first colour?"},
                                              {"from": "gpt", "value": c}]})
        else:
            records.append({"id": i, "image": f"images/{i}.png",
                            "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                              {"from": "gpt", "value": c}]})
    path = d / "train.json"
    path.write_text(json.dumps(records))
    return path


def _train(overrides):
    from fastsft.train.loop import train

    cfg = config_mod.load(None, {"output.progress": "false", "output.plot": "false", "train.threads": "1",
                                 **overrides})
    return train(cfg)


def _changed(a_dir, b_dir) -> set[str]:
    """The parts (vision_tower, multi_modal_projector, language_model) whose weights differ between two LLaVA
    directories (read by fastsft: transformers' own save and fastsft's export name the tower's keys differently)."""
    from fastsft.multimodal import load_llava

    a, b = load_llava(a_dir).state_dict(), load_llava(b_dir).state_dict()
    assert a.keys() == b.keys()
    return {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava") / "model"
    tiny_llava(seed=3).save_pretrained(d)
    return d


def test_llava_directory_trains_packed_and_its_export_loads_in_transformers(tmp_path, llava_dir):
    from transformers import LlavaForConditionalGeneration

    from fastsft.multimodal import load_llava
    from fastsft.multimodal.data import ImageLoader, image_processor, load_llava_data

    data = _write_data(tmp_path / "data")
    run = tmp_path / "run"
    summary = _train({"model.path": str(llava_dir), "model.tokenizer": "byte", "data.datasets": [str(data)],
                      "data.format": "llava", "data.max_seq_len": "64", "data.packing": "true",
                      "train.micro_batch_size": "2", "train.max_steps": "4", "train.lr": "1e-2",
                      "eval.exact_match": "4", "eval.max_new_tokens": "4", "eval.max_records": "8",
                      "output.dir": str(run)})
    assert summary["steps"] == 4 and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["output"] == str(run / "model")
    assert np.isfinite(summary["eval_after"]["eval_loss"])

    # the projector and (LoRA merged) the decoder changed; the tower did not
    assert _changed(llava_dir, run / "model") == {"multi_modal_projector", "language_model"}

    # transformers loads the export and computes fastsft's logits on a record with its image
    hf = LlavaForConditionalGeneration.from_pretrained(run / "model").eval()
    ours = load_llava(run / "model").eval()
    store, _ = load_llava_data(data, ByteTokenizer(), image_token_id=IMAGE_TOKEN, num_image_tokens=4,
                               max_seq_len=64)
    ids = torch.tensor(store.tokens[0][0], dtype=torch.long)[None]
    pixels = ImageLoader(image_processor(run / "model"))([p for p, _ in store.record_images(0)])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours.logits(ours(ids, pixel_values=pixels))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def _cli(args, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "FASTSFT_TEST_KILL_AT"}, "PYTHONWARNINGS": "ignore",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastsft", "train", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_resume_with_images_is_bitwise(tmp_path):
    """A random decoder + a CLIP tower from a directory, full fine-tune, packed: killed after step 3 and resumed,
    the final model equals the uninterrupted run's (the projector and decoder weights, bit for bit)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = tmp_path / "tower"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=28, patch_size=14)).save_pretrained(tower)
    data = _write_data(tmp_path / "data", n=40)
    args = ["--model.config", "nano", "--model.tokenizer", "byte", "--model.vision_tower", tower,
            "--model.image_token_id", 261, "--data.datasets", data, "--data.format", "llava",
            "--data.max_seq_len", 48, "--lora.enabled", "false", "--train.micro_batch_size", 2,
            "--train.grad_accum", 2, "--train.max_steps", 6, "--output.checkpoint_every", 3,
            "--eval.exact_match", 0, "--eval.max_records", 4, "--output.progress", "false",
            "--output.plot", "false", "--train.threads", 1, "--model.vision_feature_cache", 16]
    straight = _cli([*args, "--output.dir", tmp_path / "a"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _cli([*args, "--output.dir", tmp_path / "b"], env={"FASTSFT_TEST_KILL_AT": "step:3"})
    assert killed.returncode != 0 and (tmp_path / "b" / "checkpoints").is_dir()
    resumed = _cli(["--resume", tmp_path / "b"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the resume"
    # the random base was saved as a LLaVA directory beside the run (what the resume rebuilt the model from)
    assert json.loads((tmp_path / "a" / "base_model" / "config.json").read_text())["model_type"] == "llava"


def test_padded_batches_train_like_packed_ones(tmp_path, llava_dir):
    """Without packing (one record a row) the same steps run; the loss is finite and the images reach the
    model (a batch with images but no pixels would raise)."""
    data = _write_data(tmp_path / "data", n=24)
    summary = _train({"model.path": str(llava_dir), "model.tokenizer": "byte", "data.datasets": [str(data)],
                      "data.format": "llava", "data.max_seq_len": "64", "data.packing": "false",
                      "train.micro_batch_size": "4", "train.max_steps": "2", "eval.exact_match": "0",
                      "eval.max_records": "4", "output.dir": str(tmp_path / "run"), "lora.enabled": "false",
                      "train.trainable": "projector"})
    assert summary["steps"] == 2 and np.isfinite(summary["eval_after"]["eval_loss"])
    assert _changed(llava_dir, tmp_path / "run" / "model") == {"multi_modal_projector"}  # stage 1: the projector


@pytest.mark.parametrize("overrides, message", [
    ({"model.vision_tower": "demo"}, "data.datasets' must name the LLaVA JSON files"),
    ({"model.vision_tower": "demo", "data.datasets": ["x.jsonl"]}, "data.format' must be llava"),
    ({"data.format": "llava", "data.datasets": ["x.json"], "train.trainable": "projector"}, "set lora.enabled false"),
    ({"data.format": "llava", "data.datasets": ["x.json"], "data.curriculum": "length"}, "data.curriculum"),
    ({"data.format": "llava", "data.datasets": ["x.json"], "train.kl_to_base": "0.1"}, "train.kl_to_base"),
    ({"train.trainable": "projector+full", "lora.enabled": "false"}, "for multimodal runs"),
    ({"model.projector": "p.safetensors"}, "for multimodal runs"),
])
def test_config_refuses_what_multimodal_runs_do_not_do(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("'", ".").replace("(", ".")):
        config_mod.load(None, overrides)


def test_stage_two_starts_from_stage_ones_projector(tmp_path, llava_dir):
    """model.projector: a stage-1 run directory (its model/), loaded over the LLaVA's own projector; a projector
    of the wrong shape is one line naming both shapes."""
    from fastsft.multimodal import training as mm

    data = _write_data(tmp_path / "data", n=16)
    stage1 = tmp_path / "stage1"
    _train({"model.path": str(llava_dir), "model.tokenizer": "byte", "data.datasets": [str(data)],
            "data.format": "llava", "data.max_seq_len": "64", "train.max_steps": "2", "train.lr": "1e-2",
            "eval.exact_match": "0", "eval.max_records": "2", "output.dir": str(stage1), "lora.enabled": "false",
            "train.trainable": "projector"})
    cfg = config_mod.load(None, {"model.path": str(llava_dir), "model.tokenizer": "byte", "data.datasets": [str(data)],
                                 "data.format": "llava", "model.projector": str(stage1)})
    vision = mm.VisionSetup.from_config(cfg, ByteTokenizer())
    model = mm.build_model(cfg, vision, dtype=torch.float32, device="cpu")
    saved = load_file(str(stage1 / "model" / "model.safetensors"))
    for k, v in model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, saved["multi_modal_projector." + k])
    cfg.model.projector = str(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file
    save_file({"multi_modal_projector.linear_1.weight": torch.zeros(3, 3)}, cfg.model.projector)
    with pytest.raises(ConfigError, match="model.projector.*holds"):
        mm.build_model(cfg, vision, dtype=torch.float32, device="cpu")
