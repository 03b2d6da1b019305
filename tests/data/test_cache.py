"""The token-store cache: a rerun on the same data, tokenizer and options reaches step 1 without
tokenising; any change to what decides the tokens is a miss; a damaged entry is never used."""

import json

import pytest

from fastsft import config as cfgmod
from fastsft.data import cache as token_cache
from fastsft.train import loop


def cfg_for(tmp_path, name, data, **over):
    base = {"model.config": "nano", "model.tokenizer": "byte", "data.datasets": [str(data)],
            "data.format": "prompt_completion", "data.max_seq_len": 48, "train.max_steps": 1,
            "eval.exact_match": 0, "eval.max_records": 4, "output.progress": False, "output.plot": False,
            "output.dir": str(tmp_path / name)}
    return cfgmod.load(None, {**base, **over})


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"what is {i}+{i}?", "completion": str(2 * i)}) + "\n"
                         for i in range(40)))
    return p


def test_a_rerun_reaches_step_1_without_tokenising(tmp_path, data, monkeypatch):
    first = loop.train(cfg_for(tmp_path, "a", data))
    calls = []
    real = loop.build_dataset
    monkeypatch.setattr(loop, "build_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = loop.train(cfg_for(tmp_path, "b", data))
    assert calls == []  # served from the cache
    assert first["tokens"] == second["tokens"] and first["eval_after"] == second["eval_after"]
    for name in ("train.npz", "eval.npz", "report.json"):  # the run keeps its own copy for --resume
        assert (tmp_path / "b" / "data" / name).read_bytes() == (tmp_path / "a" / "data" / name).read_bytes()

    # what decides the tokens changes: a miss each time
    loop.train(cfg_for(tmp_path, "c", data, **{"data.max_seq_len": 40}))
    data.write_text(data.read_text().replace("what is 3+3", "what is 3 + 3"))
    loop.train(cfg_for(tmp_path, "d", data))
    loop.train(cfg_for(tmp_path, "e", data, **{"data.token_cache": False}))
    assert calls == [1, 1, 1]


def test_keys_and_damaged_entries(tmp_path, data):
    from fastsft.data import load_tokenizer

    tok = load_tokenizer("byte")
    key = token_cache.cache_key(cfg_for(tmp_path, "a", data), tok)
    assert key == token_cache.cache_key(cfg_for(tmp_path, "other-dir", data), tok)  # the output dir is not in it
    for over in ({"train.seed": 1}, {"data.train_on": "last"}, {"data.eval_fraction": 0.2},
                 {"data.fields": {"prompt": "prompt", "completion": "completion"}}):
        assert token_cache.cache_key(cfg_for(tmp_path, "a", data, **over), tok) != key, over
    assert token_cache.cache_key(cfg_for(tmp_path, "a", tmp_path / "missing.jsonl"), tok) is None

    loop.train(cfg_for(tmp_path, "a", data))
    entry = token_cache.lookup(key)
    assert entry is not None
    blob = bytearray((entry / "train.npz").read_bytes())
    blob[len(blob) // 2] ^= 1
    (entry / "train.npz").unlink()  # a hard link to the run's copy: replace, do not write through
    (entry / "train.npz").write_bytes(bytes(blob))
    assert token_cache.lookup(key) is None and not entry.exists()  # damaged: dropped, a miss
