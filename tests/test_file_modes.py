"""Files fastsft writes outside the trainer get the mode the process umask allows (0644 under umask 022),
not mkstemp's 0600, and leave no temporary behind."""

import os
import stat

import numpy as np
import pytest

from fastsft.data.store import TokenStore
from fastsft.model import ModelConfig, build_model
from fastsft.model import lora as lora_mod
from fastsft.train import files
from fastsft.model.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, apply_lora, load_adapter, save_adapter

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _lora_model():
    model = build_model(ModelConfig.from_name("nano"), seed=0)
    apply_lora(model, r=4, alpha=4, target_modules=["q_proj", "v_proj"])
    return model


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_save_adapter_modes_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert files.process_umask() == mask
    model = _lora_model()
    save_adapter(model, tmp_path / "adapter")
    save_adapter(model, tmp_path / "adapter")  # overwriting keeps the mode too
    assert sorted(os.listdir(tmp_path / "adapter")) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        assert _mode(tmp_path / "adapter" / name) == expected, name
    load_adapter(_lora_model(), tmp_path / "adapter")


def test_process_umask_without_proc(umask, monkeypatch):
    umask(0o027)
    real_open = open

    def no_proc(path, *a, **k):
        if str(path) == "/proc/self/status":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", no_proc)
    assert files.process_umask() == 0o027
    assert os.umask(0o027) == 0o027  # left as it was


def test_a_failed_write_leaves_no_temporary_and_names_the_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def failing_replace(src, dst):
        seen.append(os.path.basename(src))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        lora_mod._atomic_write_bytes(str(tmp_path / ADAPTER_WEIGHTS_NAME), b"x" * 100)
    [tmp] = seen
    assert tmp.startswith(f".{ADAPTER_WEIGHTS_NAME}.") and tmp.endswith(f".tmp-{os.getpid()}")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(lora_mod.os, "replace", real_replace)


def test_token_store_save_mode_and_no_temporary(tmp_path, umask):
    umask(0o027)
    store = TokenStore(np.arange(6, dtype=np.int32), np.arange(6, dtype=np.int32), np.array([0, 3, 6]),
                       np.zeros(2, np.int32), ["a"])
    path = store.save(tmp_path / "train")
    assert os.listdir(tmp_path) == ["train.npz"]
    assert _mode(path) == 0o640
    assert TokenStore.load(path).ids.tolist() == list(range(6))
