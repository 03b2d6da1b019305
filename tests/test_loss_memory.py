"""The reference loss's memory: every tensor a forward + backward allocates, counted while it lives.

The bound is the module docstring's: the gradients it returns plus the chunk buffers ([rows x V] float32:
one, two with a soft cap; with a base three of half the rows), plus O(rows) vectors and O(chunk x D)
matmul outputs. A [kept rows x V] temporary, or a second [V x D] one, breaks it. Also: gradients computed
in the forward equal the recomputed ones, and a second backward (retain_graph) recomputes."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastsft import loss as loss_mod
from fastsft.loss import fused_linear_cross_entropy

N, D, V, ROWS = 512, 32, 2000, 16  # 16 rows a chunk: ~16 chunks of the ~256 kept rows
CHUNK = ROWS * V * 4  # one [rows x V] float32 buffer: 128 kB
SLACK = 48 * 1024  # row vectors, the chunk's gathered rows and grad_h rows, index tensors


class LiveBytes(TorchDispatchMode):
    """Bytes of the CPU tensor storages that ops create inside the block (those of ``existing`` not
    counted), the peak and what is still alive; a storage counts until it is freed."""

    def __init__(self, *existing):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in existing if t is not None}
        self.current = self.peak = 0

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.seen:
                continue
            self.seen.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


@pytest.fixture
def inputs(monkeypatch):
    monkeypatch.setattr(loss_mod, "_rows_per_chunk", lambda vocab: ROWS)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g)
    hb = h + 0.3 * torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.5] = -100
    return h, hb, w, y


def _peak(h, hb, w, y, trainable, **opts):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(trainable)
    with LiveBytes(hh, ww, hb, y) as mem:
        loss = fused_linear_cross_entropy(hh, ww, y, kernels="off", **opts)
        if loss.requires_grad:
            loss.sum().backward()
        del loss
    grads = N * D * 4 + (V * D * 4 if trainable else 0)
    return mem.peak, grads, hh.grad, ww.grad


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
@pytest.mark.parametrize("softcap, buffers", [(None, 1), (3.0, 2)], ids=["plain", "softcap"])
def test_plain_peak_is_the_gradients_plus_one_chunk(inputs, trainable, softcap, buffers):
    peak, grads, *_ = _peak(*inputs, trainable, softcap=softcap, label_smoothing=0.1, z_loss=1e-4)
    assert grads + (buffers - 1) * CHUNK < peak <= grads + buffers * CHUNK + SLACK


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_kl_peak_is_the_gradients_plus_three_half_chunks(inputs, trainable):
    h, hb, w, y = inputs
    peak, grads, *_ = _peak(h, hb, w, y, trainable, base_hidden=hb, kl_beta=0.5)
    assert peak <= grads + 3 * (ROWS // 2) * V * 4 + SLACK


def test_reduction_none_recomputes_within_the_same_bound(inputs):
    peak, grads, *_ = _peak(*inputs, True, reduction="none")
    assert peak <= grads + CHUNK + SLACK


def test_no_grad_allocates_no_gradients(inputs):
    h, _, w, y = inputs
    with torch.no_grad(), LiveBytes(h, w, y) as mem:
        fused_linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), y, kernels="off")
    assert mem.peak <= CHUNK + SLACK


@pytest.mark.parametrize("kl", [False, True], ids=["ce", "kl"])
def test_forward_gradients_equal_recomputed_ones(inputs, kl):
    """reduction 'sum' (gradients in the forward) and 'none' with unit row weights (recomputed in the
    backward) agree to float32 rounding; a second backward (retain_graph) recomputes and adds the same."""
    h, hb, w, y = inputs
    opts = dict(base_hidden=hb, kl_beta=0.5) if kl else {}
    grads = []
    for reduction in ("sum", "none"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        fused_linear_cross_entropy(hh, ww, y, kernels="off", reduction=reduction, **opts).sum().backward()
        grads.append((hh.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, y, kernels="off", **opts)
    loss.backward(retain_graph=True)
    first = hh.grad.clone(), ww.grad.clone()
    loss.backward()
    torch.testing.assert_close(hh.grad, 2 * first[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ww.grad, 2 * first[1], atol=1e-6, rtol=1e-5)
