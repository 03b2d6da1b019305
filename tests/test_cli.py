"""The `fastsft` command as a user runs it: exit codes, one-line errors, the acceptance runs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FAST = ["--train.max_steps", "4", "--data.builtin_size", "200", "--eval.exact_match", "8",
        "--eval.max_new_tokens", "12", "--output.progress", "false", "--model.config", "nano",
        "--model.tokenizer", "byte"]


def fastsft(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fastsft", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_no_arguments_uses_the_embedded_default(tmp_path):
    # the full embedded default is the README's quick start; here only a few steps of it
    proc = fastsft("train", "--train.max_steps", "3", "--data.builtin_size", "300", "--eval.exact_match", "8",
                   "--output.progress", "false", "--output", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "embedded default" in out
    assert re.search(r"eval before: held-out response loss [\d.]+ .*exact match", out)
    assert re.search(r"eval after: +held-out response loss [\d.]+ .*exact match", out)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "config: tiny" in saved and "lr: 0.002" in saved


def test_missing_data_file(tmp_path):
    proc = fastsft("train", "--data", tmp_path / "nope.jsonl", *FAST, "--output", tmp_path / "run")
    assert_one_line_error(proc, "nope.jsonl")


def test_malformed_record_names_file_line_and_reason(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    proc = fastsft("train", "--data", data, *FAST, "--output", tmp_path / "run")
    assert_one_line_error(proc, "bad.jsonl:2")
    proc = fastsft("train", "--data", data, *FAST, "--skip-bad-records", "--output", tmp_path / "r2")
    assert proc.returncode == 0, proc.stderr
    assert "1 bad records skipped" in proc.stdout + proc.stderr


def test_bad_config_value_is_one_line(tmp_path):
    proc = fastsft("train", "--train.lr", "fast", "--output", tmp_path / "run")
    assert_one_line_error(proc, "train.lr")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochz: 1\n")
    assert_one_line_error(fastsft("train", cfg), "train.epochz")


def test_mixture_from_yaml_reports_proportions(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": f"a{i}"}) + "\n" for i in range(40)))
    b.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(40)]))
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(f"data:\n  datasets:\n    - {{path: {a}, weight: 1.0}}\n    - {{path: {b}, weight: 0.5}}\n"
                   "  max_seq_len: 256\n")
    proc = fastsft("train", cfg, *FAST, "--output", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    mixture_line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "mixture (records)" in l)
    assert "a.jsonl" in mixture_line and "b.json" in mixture_line
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    shares = report["mixture"]["records"]
    assert shares[next(k for k in shares if "a.jsonl" in k)] == pytest.approx(2 / 3, abs=0.05)


def test_export_merges_adapter_into_transformers_checkpoint(tmp_path):
    assert fastsft("train", *FAST, "--output", tmp_path / "run").returncode == 0
    run = tmp_path / "run"
    proc = fastsft("export", "--model", run / "base_model", "--adapter", run / "adapter", "--out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    import torch
    from transformers import AutoModelForCausalLM

    from fastsft.model import load_model
    from fastsft.model.lora import load_adapter

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ours = load_model(run / "base_model")
    load_adapter(ours, run / "adapter")
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours.logits(ours(ids)), atol=1e-4, rtol=1e-4)

    # the merged random-preset model has a tokenizer transformers loads, equal to fastsft's byte tokenizer
    from transformers import AutoTokenizer

    from fastsft.data.tokenizer import ByteTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = "<|im_start|>user\nwhat is 2+2? é 世<|im_end|>\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)[0]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (257, 258, 256)
    # the adapter names its base by an absolute path (peft run from elsewhere finds it)
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((run / "base_model").resolve())

    # a run directory given where a model or an adapter directory belongs: the hint says where they are
    proc = fastsft("export", "--model", run, "--adapter", run / "adapter", "--out", tmp_path / "m2")
    assert_one_line_error(proc, f"it is a fastsft run directory: its base model is {run / 'base_model'}")
    proc = fastsft("export", "--model", run / "base_model", "--adapter", run, "--out", tmp_path / "m2")
    assert_one_line_error(proc, f"its adapter is {run / 'adapter'}")


def test_command_line_surface():
    from fastsft import __version__

    proc = fastsft("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastsft {__version__}"
    proc = fastsft("--help")
    assert proc.returncode == 0 and "train " in proc.stdout and "export " in proc.stdout
    assert_one_line_error(fastsft("trian"), "unknown command 'trian' (did you mean 'train'?)")
    # an unknown option: one line with a did-you-mean, not the usage text
    proc = fastsft("train", "--train.lrr", "1e-3")
    assert_one_line_error(proc, "unknown option --train.lrr (did you mean --train.lr?)")
    assert len(proc.stderr.splitlines()) == 1
    # a negative number is a value (here refused by validation, by name), not "expected one argument"
    assert_one_line_error(fastsft("train", "--train.lr", "-1e-4"), "config key 'train.lr' must be positive")


def test_an_unreachable_hub_is_one_line_at_once(tmp_path, monkeypatch):
    """Offline with a hub id not in the cache: preflight says so in one line (no minute of retries)."""
    import huggingface_hub

    from fastsft import config as cfgmod
    from fastsft import preflight

    class ConnectError(Exception):  # httpx's / requests' name for "no network"
        pass

    def offline(*a, **k):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = cfgmod.load(None, {"model.path": "some-org/some-model", "output.dir": str(tmp_path / "run")})
    with pytest.raises(preflight.PreflightError) as e:
        preflight.preflight(cfg)
    (line,) = [p for p in e.value.problems if p.startswith("model.path")]
    assert "the Hub cannot be reached" in line and "hf download some-org/some-model" in line


@pytest.mark.skipif(not (SHARED / "data" / "gsm8k" / "train.jsonl").exists()
                    or not (SHARED / "tokenizers" / "llama2").exists(), reason="../shared data not present")
def test_gsm8k_with_llama2_tokenizer_and_field_mapping(tmp_path):
    config = tmp_path / "tiny-llama.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "max_position_embeddings": 512,
                                  "bos_token_id": 1, "eos_token_id": 2}))
    proc = fastsft("train", "--data", SHARED / "data" / "gsm8k" / "train.jsonl",
                   "--tokenizer", SHARED / "tokenizers" / "llama2", "--fields", "instruction=question,output=answer",
                   "--model.config", config, "--train.max_steps", "3", "--data.max_seq_len", "384",
                   "--eval.exact_match", "4", "--eval.max_new_tokens", "8", "--eval.max_records", "32",
                   "--output.progress", "false", "--output", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    assert report["datasets"][0]["format"] == "alpaca"
    assert report["train"]["records"] > 7000
    without_mapping = fastsft("train", "--data", SHARED / "data" / "gsm8k" / "train.jsonl", "--tokenizer",
                              SHARED / "tokenizers" / "llama2", "--model.config", config, "--output", tmp_path / "r2")
    assert_one_line_error(without_mapping, "train.jsonl", "question")


def test_readme_quick_start_matches_ci():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Quick start")[1].split("\n## ")[0], re.S)
    assert len(blocks) == 2
    assert blocks[0].endswith("fastsft train")
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0\n" in ci
    test_command = blocks[1].split("pip install torch==2.13.0 && ", 1)[1]
    assert test_command in ci


def test_parquet_and_save_to_disk_inputs_train(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": f"what is {i} + 1?", "answer": str(i + 1)} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    proc = fastsft("train", *FAST, "--data", tmp_path / "train.parquet", "--fields",
                   "prompt=question,completion=answer", "--output", tmp_path / "run-parquet")
    assert proc.returncode == 0, proc.stderr
    assert "train.parquet: prompt_completion format, 40 records read" in proc.stdout
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    proc = fastsft("train", *FAST, "--data", tmp_path / "ds", "--fields", "prompt=question,completion=answer",
                   "--output", tmp_path / "run-ds")
    assert proc.returncode == 0, proc.stderr
    assert "40 records read" in proc.stdout


def test_kl_anchor_and_neftune_from_the_command_line(tmp_path):
    proc = fastsft("train", *FAST, "--train.kl_to_base", "0.1", "--train.kl_tokens", "all",
                   "--train.neftune_alpha", "5", "--output", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl_to_base"] >= 0 for r in records if r["kind"] == "train")
    proc = fastsft("train", *FAST, "--lora.enabled", "false", "--train.kl_to_base", "0.1",
                   "--output", tmp_path / "full")
    assert_one_line_error(proc, "train.kl_to_base", "needs lora.enabled")
