"""The Triton fused linear cross-entropy against float64 logits + F.cross_entropy, forward and backward.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), forced
onto CPU tensors with ``use_implementation("kernel")``. Shapes stay small, and tiles and chunks are shrunk
so that several V tiles and several row chunks run, the last of each ragged.
"""

import pytest
import torch
from helpers import CUDA, DEVICE
from helpers import max_abs_err as _err
import torch.nn.functional as F

from fastsft import loss as loss_mod
from fastsft.kernels import fused_linear_cross_entropy as flce
from fastsft.loss import fused_linear_cross_entropy, use_implementation

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 in Triton's interpreter is unreliable)")


@pytest.fixture(autouse=True)
def small_tiles_and_chunks(request, monkeypatch):
    # 32-wide V tiles: V=133 is 5 tiles, the last ragged; 5-row chunks: several, the last ragged
    monkeypatch.setattr(flce, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(flce, "_chunk_rows", lambda vocab, dtype: 5)


def reference(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean", num_items=None,
              shift=False, label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False):
    """Materialised logits (in the inputs' dtype) and torch's own cross-entropy."""
    if shift:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.reshape(-1, z.shape[-1])
    y = labels.reshape(-1)
    per_row = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    z_term = z_loss * torch.logsumexp(z.float() if z.dtype != torch.float64 else z, -1) ** 2 * (y != ignore_index)
    per_row = per_row + z_term.to(per_row.dtype)

    def reduce(v):
        if reduction == "none":
            return v.reshape(labels.shape)
        if num_items is not None:
            return v.sum() / num_items
        if reduction == "mean":
            return v.sum() / max(int((y != ignore_index).sum()), 1)
        return v.sum()

    return (reduce(per_row), reduce(z_term.detach())) if return_z_loss else reduce(per_row)


def _inputs(n=37, d=48, v=133, masked=0.4, seed=0, bias=True, dtype=torch.float32, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < masked] = ignore_index
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(DEVICE)


def _leaves(tensors, dtype, trainable):
    hidden, weight, b = tensors
    return [None if t is None else t.detach().to(dtype).requires_grad_(t is hidden or trainable)
            for t in (hidden, weight, b)]


def _run(fn, leaves, labels, opts, grad_out):
    out = fn(leaves[0], leaves[1], labels, leaves[2], **opts)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward(grad_out.to(loss.dtype))
    grads = [None if t is None or not t.requires_grad else t.grad for t in leaves]
    return out, grads


def _kernel(*args, **kwargs):
    with use_implementation("kernel"):
        return fused_linear_cross_entropy(*args, **kwargs)


def _check(opts, *, n=37, d=48, v=133, masked=0.4, trainable=True, bias=True, seed=0, atol=1e-5):
    """fp32 kernel vs float64 reference: loss (and z term) to ~1e-5, every gradient."""
    hidden, weight, b, labels = _inputs(n, d, v, masked, seed, bias, ignore_index=opts.get("ignore_index", -100))
    got_leaves = _leaves((hidden, weight, b), torch.float32, trainable)
    ref_leaves = _leaves((hidden, weight, b), torch.float64, trainable)
    per_row = opts.get("reduction") == "none"
    grad_out = torch.randn(n, dtype=torch.float64, device=DEVICE) if per_row else torch.tensor(1.7, device=DEVICE)
    got, got_grads = _run(_kernel, got_leaves, labels, opts, grad_out)
    want, want_grads = _run(reference, ref_leaves, labels, opts, grad_out)
    if opts.get("return_z_loss"):
        torch.testing.assert_close(got[1].double(), want[1], atol=atol, rtol=1e-5)
        got, want = got[0], want[0]
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=1e-4)
    if not trainable:
        assert got_leaves[1].grad is None and (got_leaves[2] is None or got_leaves[2].grad is None)


# ----------------------------------------------------------------------------------------------------
# fp32 against float64: every option, frozen and trainable head

OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_items": 53},
    {"num_items": torch.tensor(29.0)},
    {"shift": True},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"ignore_index": 7},
    {"z_loss": 1e-2, "return_z_loss": True},
    {"z_loss": 1e-2, "return_z_loss": True, "reduction": "none"},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "reduction": "sum"},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "reduction": "none", "shift": True},
]


def _ids(opts):
    return ",".join(f"{k}={v.item() if torch.is_tensor(v) else v}" for k, v in opts.items()) or "default"


@pytest.mark.parametrize("opts", OPTIONS, ids=_ids)
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_matches_float64_reference(opts, trainable):
    opts = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in opts.items()}
    _check(opts, trainable=trainable)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_bias_and_head(bias, trainable):
    _check({"label_smoothing": 0.1}, bias=bias, trainable=trainable, seed=3)


@pytest.mark.parametrize("v", [7, 32, 128, 133, 300])
def test_vocab_sizes(v):
    # 7: one masked tile; 32/128: exact multiples of the tile; 133/300: ragged last tile
    _check({"softcap": 4.0}, v=v, n=23, seed=v)


@pytest.mark.parametrize("masked", [0.0, 1.0], ids=["no-rows-ignored", "all-rows-ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_edge_masks(masked, reduction):
    _check({"reduction": reduction}, masked=masked)


def test_single_row_chunk_and_default_chunking(monkeypatch):
    monkeypatch.setattr(flce, "_chunk_rows", lambda vocab, dtype: 1)
    _check({"z_loss": 1e-3}, n=9)
    monkeypatch.undo()
    _check({"z_loss": 1e-3}, n=9)  # the real _chunk_rows: one chunk


def test_chunk_rows_constant(monkeypatch):
    monkeypatch.undo()  # the real function, not the fixture's
    assert flce._chunk_rows(151936, torch.bfloat16) == flce.CHUNK_BYTES // (151936 * 2) == 883
    assert flce._chunk_rows(10**12, torch.float32) == 1


# ----------------------------------------------------------------------------------------------------
# fp16: no worse than torch's own fp16 (2x its error against float64, plus a small atol)


def _torch_fp16_error_bound(opts, trainable):
    hidden, weight, b, labels = _inputs(masked=0.3, seed=5)
    grad_out_shape = (37,) if opts.get("reduction") == "none" else ()
    grad_out = torch.randn(grad_out_shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ref, ref_grads = _run(reference, _leaves((hidden, weight, b), torch.float64, trainable), labels, opts,
                          grad_out.double())
    torch16, torch16_grads = _run(reference, _leaves((hidden, weight, b), torch.float16, trainable), labels,
                                  opts, grad_out)
    return (hidden, weight, b, labels, grad_out), (ref, ref_grads), (torch16, torch16_grads)


@pytest.mark.parametrize("opts", [{}, {"reduction": "none"},
                                  {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "reduction": "sum"}],
                         ids=_ids)
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_fp16_no_worse_than_torch(opts, trainable):
    (hidden, weight, b, labels, grad_out), (ref, ref_grads), (t16, t16_grads) = _torch_fp16_error_bound(
        opts, trainable)
    leaves = _leaves((hidden, weight, b), torch.float16, trainable)
    got, got_grads = _run(_kernel, leaves, labels, opts, grad_out)
    assert _err(got, ref) <= 2 * _err(t16, ref) + 1e-3
    for g, t, r in zip(got_grads, t16_grads, ref_grads):
        if r is None:
            continue
        assert g.dtype == torch.float16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item(), (_err(g, r), _err(t, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_accumulate_in_weight_dtype(dtype):
    """accumulate_in_fp32=False (grad_W summed over chunks in the weight dtype) through the Function."""
    hidden, weight, b, labels = _inputs(masked=0.0, seed=11)
    ref_leaves = _leaves((hidden, weight, b), torch.float64, True)
    _, ref_grads = _run(reference, ref_leaves, labels, {"reduction": "sum"}, torch.tensor(1.0, device=DEVICE))
    errs = {}
    for acc32 in (True, False):
        h, w, bb = _leaves((hidden, weight, b), dtype, True)
        opts = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, accumulate_in_fp32=acc32)
        loss, _ = flce.FusedLinearCrossEntropyFunction.apply(h, w, bb, labels, 1.0, opts)
        loss.backward()
        errs[acc32] = [_err(g, r) for g, r in zip((h.grad, w.grad, bb.grad), ref_grads)]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max(errs[False]) < tol and max(errs[True]) < tol, errs
    if dtype == torch.float32:  # the same arithmetic: fp32 weight has no separate buffer
        assert errs[True] == errs[False]
    else:  # 8 chunks summed in fp16 lose more than one rounding of an fp32 sum
        assert errs[True][1] <= errs[False][1], errs


# ----------------------------------------------------------------------------------------------------
# the row kernel on its own


def test_cross_entropy_rows_guards_and_modes():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 133, generator=g).to(DEVICE)
    targets = torch.randint(0, 133, (6,), generator=g).to(DEVICE)
    targets[2] = -100
    want = F.cross_entropy(logits.double(), targets, reduction="none")
    want_lse = torch.logsumexp(logits.double(), -1)

    z = logits.clone()
    loss, lse, z_term = flce.cross_entropy_rows(z, targets)  # no gradient pass: logits untouched
    assert torch.equal(z, logits)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    assert loss[2] == 0 and torch.count_nonzero(z_term) == 0

    row_scale = torch.rand(6, generator=g).to(DEVICE)
    zd = logits.double().requires_grad_()
    (F.cross_entropy(zd, targets, reduction="none") * row_scale).sum().backward()
    for given in (None, lse):  # recompute lse, or reuse the forward's (the reduction="none" backward)
        z = logits.clone()
        flce.cross_entropy_rows(z, targets, scale=row_scale, lse=given, compute_grad=True)
        torch.testing.assert_close(z.double(), zd.grad, atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(z[2]) == 0  # ignored row: zero gradient


def test_empty_rows():
    hidden, weight, b, labels = _inputs(masked=1.0)
    losses, lse, z_terms, grad_h, grad_w, grad_b = flce.fused_linear_cross_entropy_forward(
        hidden[:0], weight, b, labels[:0])
    assert losses.numel() == 0 and grad_h.shape == (0, 48)
    assert torch.count_nonzero(grad_w) == 0 and torch.count_nonzero(grad_b) == 0


# ----------------------------------------------------------------------------------------------------
# dispatch, eval, autograd corner cases


@pytest.mark.parametrize("opts", [{}, {"reduction": "none", "z_loss": 1e-3, "return_z_loss": True},
                                  {"label_smoothing": 0.1, "softcap": 3.0, "num_items": 40}], ids=_ids)
def test_kernel_and_reference_paths_agree(opts):
    hidden, weight, b, labels = _inputs(seed=4)
    results = {}
    for impl in ("kernel", "reference"):
        leaves = _leaves((hidden, weight, b), torch.float32, True)
        with use_implementation(impl):
            grad_out = torch.ones(()) if opts.get("reduction") != "none" else torch.ones(37)
            out, grads = _run(fused_linear_cross_entropy, leaves, labels, opts, grad_out.to(DEVICE))
        results[impl] = (out if isinstance(out, tuple) else (out,), grads)
    for a, c in zip(results["kernel"][0] + tuple(results["kernel"][1]),
                    results["reference"][0] + tuple(results["reference"][1])):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_dispatch(monkeypatch):
    hidden, weight, b, labels = _inputs()
    calls = []
    real = loss_mod._kernel_loss
    monkeypatch.setattr(loss_mod, "_kernel_loss", lambda *a: calls.append(1) or real(*a))
    fused_linear_cross_entropy(hidden, weight, labels, b)
    assert calls == ([1] if CUDA else [])  # auto: the kernel only for CUDA tensors
    fused_linear_cross_entropy(hidden, weight, labels, b, kernels="on")
    assert len(calls) == 1 + CUDA
    with use_implementation("reference"):  # the override beats the per-call choice
        fused_linear_cross_entropy(hidden, weight, labels, b, kernels="on")
    assert len(calls) == 1 + CUDA
    with use_implementation("kernel"):
        fused_linear_cross_entropy(hidden, weight, labels, b, kernels="off")
    assert len(calls) == 2 + CUDA and loss_mod._impl_override is None
    with pytest.raises(ValueError, match="implementation"):
        with use_implementation("triton"):
            pass
    with pytest.raises(ValueError, match="kernels"):
        fused_linear_cross_entropy(hidden, weight, labels, b, kernels="yes")


def test_no_grad_eval_path():
    hidden, weight, b, labels = _inputs(seed=6)
    for opts in ({}, {"reduction": "none", "softcap": 2.0}):
        with torch.no_grad():
            got = _kernel(hidden, weight, labels, b, **opts)
        want = reference(hidden.double(), weight.double(), labels, b.double(), **opts)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert not got.requires_grad


def test_second_backward_raises():
    hidden, weight, b, labels = _inputs()
    h = hidden.clone().requires_grad_()
    loss = _kernel(h, weight, labels, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


# ----------------------------------------------------------------------------------------------------
# bf16 on the GPU (the interpreter's bf16 is unreliable)


@cuda_only
@pytest.mark.parametrize("opts", [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}],
                         ids=_ids)
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_bf16_no_worse_than_torch(opts, trainable):
    hidden, weight, b, labels = _inputs(n=64, v=300, masked=0.3, seed=8)
    grad_out = torch.randn(64, device=DEVICE) if opts.get("reduction") == "none" else torch.tensor(1.0, device=DEVICE)
    ref, ref_grads = _run(reference, _leaves((hidden, weight, b), torch.float64, trainable), labels, opts,
                          grad_out.double())
    tb, tb_grads = _run(reference, _leaves((hidden, weight, b), torch.bfloat16, trainable), labels, opts, grad_out)
    got, got_grads = _run(_kernel, _leaves((hidden, weight, b), torch.bfloat16, trainable), labels, opts, grad_out)
    assert _err(got, ref) <= 2 * _err(tb, ref) + 1e-2
    for g, t, r in zip(got_grads, tb_grads, ref_grads):
        if r is not None:
            assert g.dtype == torch.bfloat16 and _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item()


@cuda_only
def test_cuda_default_tiles_large_vocab(monkeypatch):
    monkeypatch.undo()  # real MAX_BLOCK_V and chunking
    _check({"label_smoothing": 0.1, "z_loss": 1e-4}, n=256, d=64, v=50257, atol=2e-5)
