"""Safe loading: weights are written and read as safetensors only, nothing is unpickled, and no code
from a model or tokenizer directory runs unless the user sets model.trust_remote_code."""

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsft import config as cfgmod
from fastsft.data import TokenStore, load_tokenizer
from fastsft.train import loop

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("fastsft", "kernels") for p in (REPO / d).rglob("*.py"))


def _name(node) -> str:
    """Dotted name of a call's function: torch.load, np.load, pickle.loads, ..."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def unsafe_calls(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {m}" for m in mods if m.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib")]
        if not isinstance(node, ast.Call):
            continue
        fn = _name(node.func)
        last = fn.rsplit(".", 1)[-1]
        if fn in ("torch.load",) and _kw(node, "weights_only") is not True:
            found.append(f"{fn} without weights_only=True")
        if fn in ("torch.save",):
            found.append(f"{fn} (pickle; write safetensors)")
        if fn in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
            found.append(f"{fn} without allow_pickle=False")
        if last in ("Unpickler", "pickle_load") or fn.startswith(("pickle.", "cloudpickle.", "dill.")):
            found.append(fn)
        if _kw(node, "trust_remote_code") is True:
            found.append(f"{fn}(trust_remote_code=True)")
        if last == "from_pretrained" and fn.startswith(("AutoTokenizer", "AutoModel", "AutoConfig")) \
                and _kw(node, "trust_remote_code") is None:
            found.append(f"{fn} without an explicit trust_remote_code")
    return found


def test_the_scanner_catches_what_it_should():
    bad = ("import pickle\nimport torch, numpy as np\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "np.load(p)\ntorch.save(x, f)\nAutoTokenizer.from_pretrained(p)\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert len(unsafe_calls(bad)) == 7, unsafe_calls(bad)
    good = "torch.load(f, weights_only=True)\nnp.load(p, allow_pickle=False)\nAutoTokenizer.from_pretrained(p, trust_remote_code=t)\n"
    assert unsafe_calls(good) == []


def test_no_pickle_loading_anywhere_in_the_package():
    assert SOURCES and any(p.name == "checkpoint.py" for p in SOURCES)
    found = {str(p.relative_to(REPO)): c for p in SOURCES if (c := unsafe_calls(p.read_text()))}
    assert found == {}, found


def test_trust_remote_code_is_off_unless_set(tmp_path, monkeypatch):
    assert cfgmod.load(None).model.trust_remote_code is False
    assert cfgmod.load(None, {"model.trust_remote_code": "true"}).model.trust_remote_code is True
    seen = []

    def fake_from_pretrained(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise OSError("stop here")

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    for kwargs in ({}, {"trust_remote_code": True}):
        with pytest.raises(ValueError, match="stop here"):
            load_tokenizer(tmp_path, **kwargs)
    assert seen == [False, True]

    # the trainer passes the config key through
    passed = []

    def record(spec, **kwargs):
        passed.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("tokenizer requested")

    monkeypatch.setattr(loop, "load_tokenizer", record)
    for value in (False, True):
        cfg = cfgmod.load(None, {"model.config": "nano", "train.max_steps": 1, "output.dir": str(tmp_path / "r"),
                                 "model.trust_remote_code": value})
        with pytest.raises(RuntimeError, match="tokenizer requested"):
            loop.train(cfg)
    assert passed == [False, True]


def test_a_run_writes_and_resumes_without_pickle(tmp_path, monkeypatch):
    cfg = cfgmod.load(None, {"model.config": "nano", "model.tokenizer": "byte", "data.builtin_size": 60,
                             "data.max_seq_len": 48, "train.max_steps": 2, "eval.exact_match": 0,
                             "eval.max_records": 8, "output.progress": False, "output.plot": False,
                             "output.dir": str(tmp_path / "run")})
    loop.train(cfg)
    run = tmp_path / "run"
    suffixes = {p.suffix for p in run.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, suffixes
    assert {p.suffix for p in (run / "checkpoints").rglob("*") if p.is_file()} <= {".safetensors", ".json"}

    def refuse(*a, **k):
        raise AssertionError("pickle loading")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    resumed = cfgmod.load(run / "config.yaml", {"train.max_steps": 3})
    assert loop.train(resumed, resume=True)["steps"] == 3  # checkpoint, token stores, base model: no pickle


def test_token_store_refuses_pickled_arrays(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, ids=np.zeros(2, np.int32), labels=np.zeros(2, np.int32), offsets=np.array([0, 2]),
             source=np.zeros(1, np.int16), names=np.array([{"payload": 1}], dtype=object), version=np.asarray(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        TokenStore.load(p)
