"""The config tree: YAML + dotted overrides, types, unknown keys, and --help covering every option."""

import subprocess
import sys

import pytest

from fastsft import config as cfgmod
from fastsft.cli import _train_parser


def test_defaults_follow_practice():
    cfg = cfgmod.load(None)
    assert cfg.train.lr == 2e-4 and cfg.lora.r == 16 and cfg.lora.alpha == 16
    assert cfg.train.warmup_ratio == 0.03 and cfg.train.weight_decay == 0.0
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-4\n  max_steps: 7\nlora:\n  r: 8\ndata:\n  datasets:\n"
                    "    - path: a.jsonl\n      fields: {prompt: question, completion: answer}\n      weight: 2\n")
    cfg = cfgmod.load(path, {"train.lr": "3e-5", "lora.target_modules": "q_proj,v_proj",
                             "data.fields": "prompt=question,completion=answer", "lora.rslora": "true"})
    assert cfg.train.lr == 3e-5 and cfg.train.max_steps == 7 and cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.rslora is True
    assert cfg.data.fields == {"prompt": "question", "completion": "answer"}
    assert cfg.data.datasets[0]["weight"] == 2


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lrr: 1\n", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian:\n  lr: 1\n", "unknown config key 'trian'"),
    ("train:\n  lr: fast\n", "config key 'train.lr' expects float"),
    ("train:\n  schedule: step\n", "config key 'train.schedule' must be one of cosine, linear, constant"),
    ("lora:\n  enabled: maybe\n", "config key 'lora.enabled' expects bool"),
    ("train: 3\n", "section 'train' must be a mapping"),
    ("train:\n  warmup_ratio: 1.5\n", "config key 'train.warmup_ratio' must be in [0, 1)"),
    ("data:\n  datasets: [{file: x}]\n", "config key 'data.datasets' entry 0"),
])
def test_bad_yaml_names_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.load(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value) or "config key" in str(e.value)


def test_unknown_override_and_bad_value():
    with pytest.raises(cfgmod.ConfigError, match="unknown config key 'lora.rank'"):
        cfgmod.load(None, {"lora.rank": "4"})
    with pytest.raises(cfgmod.ConfigError, match="'train.micro_batch_size' expects int"):
        cfgmod.load(None, {"train.micro_batch_size": "1.5"})


def test_help_documents_every_option():
    text = _train_parser().format_help()
    for key, f in cfgmod.iter_options():
        assert f"--{key}" in text, key
        assert f.metadata["help"], key


def test_cli_rejects_unknown_flag():
    proc = subprocess.run([sys.executable, "-m", "fastsft", "train", "--train.lrr", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fastsft train: error: unknown option --train.lrr (did you mean --train.lr?); "
                                   "fastsft train --help lists every option")
    assert "Traceback" not in proc.stderr


def test_resolved_config_round_trips(tmp_path):
    cfg = cfgmod.load(None, {"train.lr": "5e-5", "data.datasets": "x.jsonl"})
    cfgmod.dump(cfg, tmp_path / "config.yaml")
    again = cfgmod.load(tmp_path / "config.yaml")
    assert again == cfg


def test_replay_is_validated_in_one_line(tmp_path):
    from fastsft import config as cfgmod

    prose = tmp_path / "prose.txt"
    prose.write_text("Some plain text.\n\nMore of it.\n")
    ok = cfgmod.load(None, {"data.replay": {"path": str(prose), "weight": "0.25"}})  # a command-line string
    assert ok.data.replay["weight"] == 0.25
    for replay, needle in (({"path": str(prose)}, "data.replay"), ({"path": str(prose), "weight": 1.0}, "weight"),
                           ({"path": str(prose), "weight": 0.2, "format": "text"}, "data.replay")):
        with pytest.raises(cfgmod.ConfigError, match=needle) as e:
            cfgmod.load(None, {"data.replay": replay})
        assert "\n" not in str(e.value)
    with pytest.raises(cfgmod.ConfigError, match="forgetting meter would measure text it trains on"):
        cfgmod.load(None, {"data.replay": {"path": str(prose), "weight": 0.2}, "data.general_text": str(prose)})
