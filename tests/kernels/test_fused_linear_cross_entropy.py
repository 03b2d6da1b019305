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


# ----------------------------------------------------------------------------------------------------
# the KL anchor to a base model: the row kernel's HAS_BASE variant (half-width V tiles: 16 here, so V=133
# is 9 tiles, the last ragged; half the chunk rows: 2 here, so 19 chunks over 37 rows, the last ragged)


def kl_reference(hidden, weight, labels, bias=None, *, base_hidden, kl_beta, kl_mask=None, ignore_index=-100,
                 reduction="mean", num_items=None, shift=False, label_smoothing=0.0, z_loss=0.0, softcap=None,
                 return_z_loss=True, return_kl=True):
    """Materialised logits of both models (in the inputs' dtype): torch's cross-entropy and z-loss on the
    labelled rows plus kl_beta * KL(p_base || p) on those and kl_mask's; (loss, z term, KL) reduced, "mean"
    over the labelled rows."""
    if shift:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
        if kl_mask is not None:
            kl_mask = torch.cat([kl_mask[..., 1:], torch.zeros_like(kl_mask[..., :1])], dim=-1)

    def logits(x):
        z = F.linear(x, weight, bias)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return z.reshape(-1, z.shape[-1])

    z, zb = logits(hidden), logits(base_hidden).detach()  # z_base is a constant: no gradient, not even to W
    y = labels.reshape(-1)
    labelled = y != ignore_index
    rows = labelled | kl_mask.reshape(-1) if kl_mask is not None else labelled
    ce = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    z_term = z_loss * torch.logsumexp(z.float() if z.dtype != torch.float64 else z, -1) ** 2 * labelled
    lp, lpb = torch.log_softmax(z, -1), torch.log_softmax(zb, -1)
    kl = torch.where(rows, (lpb.exp() * (lpb - lp)).sum(-1), 0.0)
    per_row = ce + z_term.to(ce.dtype) + kl_beta * kl

    def reduce(v):
        if reduction == "none":
            return v.reshape(labels.shape)
        if num_items is not None:
            return v.sum() / num_items
        if reduction == "mean":
            return v.sum() / max(int(labelled.sum()), 1)
        return v.sum()

    out = (reduce(per_row),) + ((reduce(z_term.detach()),) if return_z_loss else ()) + (
        (reduce(kl.detach()),) if return_kl else ())
    return out if len(out) > 1 else out[0]


def _kl_inputs(n=37, d=48, v=133, masked=0.4, seed=0, bias=True, dtype=torch.float32, ignore_index=-100,
               kl_rows=0.3):
    hidden, weight, b, labels = _inputs(n, d, v, masked, seed, bias, dtype, ignore_index)
    g = torch.Generator().manual_seed(seed + 1000)
    base = hidden + (0.5 * torch.randn(n, hidden.shape[1], generator=g)).to(DEVICE, dtype)  # a nearby base
    kl_mask = (torch.rand(n, generator=g) < kl_rows).to(DEVICE)
    return hidden, base, weight, b, labels, kl_mask


def _kl_run(fn, leaves, base, labels, opts, grad_out):
    return _run(fn, leaves, labels, dict(opts, base_hidden=base, return_z_loss=True, return_kl=True), grad_out)


def _check_kl(opts, *, n=37, d=48, v=133, masked=0.4, trainable=True, bias=True, seed=0, atol=1e-5,
              with_mask=True, kl_rows=0.3):
    """fp32 kernel vs float64 full-logit autograd (loss, z term, KL, every gradient), and vs the fp32
    reference path of fastsft.loss."""
    opts = dict({"kl_beta": 0.7}, **opts)
    hidden, base, weight, b, labels, kl_mask = _kl_inputs(
        n, d, v, masked, seed, bias, ignore_index=opts.get("ignore_index", -100), kl_rows=kl_rows)
    if with_mask:
        opts["kl_mask"] = kl_mask
    per_row = opts.get("reduction") == "none"
    grad_out = torch.randn(n, dtype=torch.float64, device=DEVICE) if per_row else torch.tensor(1.7, device=DEVICE)
    got_leaves = _leaves((hidden, weight, b), torch.float32, trainable)
    got, got_grads = _kl_run(_kernel, got_leaves, base, labels, opts, grad_out)
    want, want_grads = _kl_run(kl_reference, _leaves((hidden, weight, b), torch.float64, trainable), base.double(),
                               labels, opts, grad_out)
    with use_implementation("reference"):
        ours, ours_grads = _kl_run(fused_linear_cross_entropy, _leaves((hidden, weight, b), torch.float32, trainable),
                                   base, labels, opts, grad_out)
    assert len(got) == 3
    for a, w, r in zip(got, want, ours):
        assert a.dtype == torch.float32 and a.shape == w.shape
        torch.testing.assert_close(a.double(), w, atol=atol, rtol=1e-5)
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    for g, w, r in zip(got_grads, want_grads, ours_grads):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=1e-4)
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    if not trainable:
        assert got_leaves[1].grad is None and (got_leaves[2] is None or got_leaves[2].grad is None)
    return got, want


KL_OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_items": 53},
    {"num_items": torch.tensor(29.0)},
    {"shift": True},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"ignore_index": 7},
    {"kl_beta": 2.5, "reduction": "none"},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "reduction": "sum"},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "reduction": "none", "shift": True},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "num_items": 41},
]


@pytest.mark.parametrize("opts", KL_OPTIONS, ids=_ids)
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_kl_matches_float64_reference(opts, trainable):
    opts = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in opts.items()}
    got, want = _check_kl(opts, trainable=trainable)
    kl = want[2].abs().max() if want[2].dim() else want[2].abs()
    assert float(kl) > 1e-2  # the base differs: the KL is not trivially 0


@pytest.mark.parametrize("opts", [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}],
                         ids=_ids)
def test_kl_on_labelled_rows_only(opts):
    """No kl_mask: the KL rides on the labelled rows alone (nothing is kept for the rest)."""
    _check_kl(opts, with_mask=False, seed=12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_kl_bias_and_head(bias, trainable):
    _check_kl({"label_smoothing": 0.1, "softcap": 4.0}, bias=bias, trainable=trainable, seed=3)


@pytest.mark.parametrize("v", [7, 16, 32, 133, 300])
def test_kl_vocab_sizes(v):
    # 7: one masked tile; 16/32: exact multiples of the (half-width) tile; 133/300: ragged last tile
    _check_kl({"softcap": 4.0, "z_loss": 1e-3}, v=v, n=23, seed=v)


@pytest.mark.parametrize("case", ["no-rows-ignored", "all-rows-kl-only", "half-rows-kl-only", "all-rows-ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kl_edge_masks(case, reduction):
    # all-rows-kl-only: no label anywhere, every row kept by kl_mask (the mean divides by max(0, 1));
    # all-rows-ignored: no label and no kl_mask, nothing reaches a matmul
    masked, kl_rows, with_mask = {"no-rows-ignored": (0.0, 0.3, True), "all-rows-kl-only": (1.0, 1.1, True),
                                  "half-rows-kl-only": (0.5, 1.1, True),
                                  "all-rows-ignored": (1.0, 0.0, False)}[case]
    got, want = _check_kl({"reduction": reduction, "z_loss": 1e-2}, masked=masked, kl_rows=kl_rows,
                          with_mask=with_mask)
    if case == "all-rows-ignored":
        assert torch.count_nonzero(got[0]) == 0
    if case == "all-rows-kl-only":
        assert torch.count_nonzero(got[1]) == 0  # no z-loss term without a label
        torch.testing.assert_close(got[0], 0.7 * got[2])  # the loss is beta KL alone


def test_kl_chunk_boundaries(monkeypatch):
    for rows in (1, 3, 7):  # KL chunks of 1, 1 and 3 rows (half of _chunk_rows)
        monkeypatch.setattr(flce, "_chunk_rows", lambda vocab, dtype: rows)
        _check_kl({"z_loss": 1e-3, "reduction": "none"}, n=9, seed=rows)
    monkeypatch.undo()
    _check_kl({"z_loss": 1e-3, "softcap": 3.0}, n=9)  # the real _chunk_rows: one chunk, real MAX_BLOCK_V


def test_kl_chunk_rows_constant(monkeypatch):
    monkeypatch.undo()  # the real function, not the fixture's
    assert flce._kl_chunk_rows(151936, torch.bfloat16) == flce._chunk_rows(151936, torch.bfloat16) // 2 == 441
    assert flce._kl_chunk_rows(10**12, torch.float32) == 1


@pytest.mark.parametrize("opts", [{}, {"reduction": "none"},
                                  {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "reduction": "sum"}],
                         ids=_ids)
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_kl_fp16_no_worse_than_torch(opts, trainable):
    """fp16 kernel vs float64: within 2x the error of torch's fp16 materialised logits (plus a small atol)."""
    hidden, base, weight, b, labels, kl_mask = _kl_inputs(masked=0.3, seed=5)
    opts = dict(opts, kl_beta=0.7, kl_mask=kl_mask)
    grad_out = torch.randn((37,) if opts.get("reduction") == "none" else (),
                           generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ref, ref_grads = _kl_run(kl_reference, _leaves((hidden, weight, b), torch.float64, trainable), base.double(),
                             labels, opts, grad_out.double())
    t16, t16_grads = _kl_run(kl_reference, _leaves((hidden, weight, b), torch.float16, trainable), base.half(),
                             labels, opts, grad_out)
    got, got_grads = _kl_run(_kernel, _leaves((hidden, weight, b), torch.float16, trainable), base.half(), labels,
                             opts, grad_out)
    for name, g, t, r in zip(("loss", "z_term", "kl"), got, t16, ref):
        assert g.dtype == torch.float32, name
        assert _err(g, r) <= 2 * _err(t, r) + 1e-3, (name, _err(g, r), _err(t, r))
    for g, t, r in zip(got_grads, t16_grads, ref_grads):
        if r is None:
            continue
        assert g.dtype == torch.float16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item(), (_err(g, r), _err(t, r))


@pytest.mark.parametrize("opts", [{}, {"reduction": "none", "softcap": 3.0, "z_loss": 1e-3},
                                  {"label_smoothing": 0.1, "num_items": 40}], ids=_ids)
def test_beta_zero_or_no_base_is_the_plain_kernel_bit_for_bit(opts, monkeypatch):
    hidden, base, weight, b, labels, kl_mask = _kl_inputs(seed=4)
    kl_launches = []
    real = flce._chunked_logits_and_grads
    monkeypatch.setattr(flce, "_chunked_logits_and_grads",
                        lambda *a, **k: kl_launches.append(k.get("h_base") is not None) or real(*a, **k))
    grad_out = torch.randn(37) if opts.get("reduction") == "none" else torch.tensor(1.3)
    results = []
    for extra in ({}, {"base_hidden": base, "kl_beta": 0.0, "kl_mask": kl_mask},
                  {"base_hidden": None, "kl_beta": 0.5, "kl_mask": kl_mask}):
        leaves = _leaves((hidden, weight, b), torch.float32, True)
        out, grads = _run(_kernel, leaves, labels, dict(opts, return_z_loss=True, **extra), grad_out.to(DEVICE))
        results.append((*out, *grads))
    assert kl_launches and not any(kl_launches)  # the HAS_BASE variant never ran
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def test_kl_variant_with_beta_zero_is_the_cross_entropy():
    """The HAS_BASE kernel itself with beta = 0 and every row labelled, at the plain kernel's tile width and
    chunk rows: the plain losses and gradients bit for bit (the KL adds exactly 0)."""
    hidden, base, weight, b, labels, _ = _kl_inputs(masked=0.0, seed=6)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, block_v=32, chunk_rows=5)
    plain = flce.fused_linear_cross_entropy_forward(hidden, weight, b, labels, **opts)
    with_base = flce.fused_linear_cross_entropy_kl_forward(hidden, base, weight, b, labels, kl_beta=0.0, **opts)
    for a, c in zip(plain, with_base[:3] + with_base[5:]):  # loss, lse, z_term, grad_h, grad_W, grad_b
        assert torch.equal(a, c)
    assert with_base[3].min() > 0  # the KL is still measured


def test_identical_base_gives_zero_kl_and_the_ce_gradient():
    hidden, _, weight, b, labels, kl_mask = _kl_inputs(seed=7)
    got = [_run(_kernel, _leaves((hidden, weight, b), torch.float32, True), labels, extra, torch.tensor(1.0))
           for extra in ({}, dict(base_hidden=hidden, kl_beta=3.0, return_kl=True))]
    (plain, plain_grads), ((loss, kl), grads) = got
    assert abs(float(kl)) < 1e-6
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=0)
    for a, c in zip(grads, plain_grads):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_cross_entropy_rows_with_base():
    """The row kernel alone: KL-only rows (target -1), the forward, and the LSE_GIVEN gradient pass with
    per-row scales, against float64 autograd on the rows."""
    g = torch.Generator().manual_seed(2)
    n, v, beta, cap = 6, 133, 0.6, 4.0
    x = (3 * torch.randn(n, v, generator=g)).to(DEVICE)  # pre-cap logits
    xb = x + torch.randn(n, v, generator=g).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    targets[2] = -1

    xd = x.double().requires_grad_()
    zd, zbd = cap * torch.tanh(xd / cap), cap * torch.tanh(xb.double() / cap)
    lp, lpb = torch.log_softmax(zd, -1), torch.log_softmax(zbd, -1)
    want_kl = (lpb.exp() * (lpb - lp)).sum(-1)
    ce = F.cross_entropy(zd, targets.clamp_min(0), reduction="none", label_smoothing=0.1) * (targets >= 0)
    want = ce + beta * want_kl
    row_scale = torch.rand(n, generator=g).to(DEVICE)
    (want * row_scale).sum().backward()

    opts = dict(label_smoothing=0.1, softcap=cap, kl_beta=beta)
    z, zb = x.clone(), xb.clone()
    loss, lse, z_term, kl, lse_base = flce.cross_entropy_rows(z, targets, base=zb, **opts)
    assert torch.equal(z, x) and torch.equal(zb, xb)  # no gradient pass: both untouched
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl.double(), want_kl.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_base.double(), torch.logsumexp(zbd, -1), atol=1e-5, rtol=1e-5)
    for given in (None, (lse, lse_base)):  # recompute both lse, or reuse the forward's ("none"'s backward)
        z = x.clone()
        lse_opts = {} if given is None else dict(lse=given[0], lse_base=given[1])
        flce.cross_entropy_rows(z, targets, base=zb, scale=row_scale, compute_grad=True, **lse_opts, **opts)
        torch.testing.assert_close(z.double(), xd.grad, atol=1e-6, rtol=1e-5)
        assert torch.equal(zb, xb)  # the base's logits are only read
    with pytest.raises(ValueError, match="lse_base"):
        flce.cross_entropy_rows(x.clone(), targets, base=zb, lse=lse, compute_grad=True)
    with pytest.raises(ValueError, match="base logits"):
        flce.cross_entropy_rows(x.clone(), targets, base=zb[:, :-1].contiguous())


def test_kl_empty_rows():
    hidden, base, weight, b, labels, _ = _kl_inputs(masked=1.0)
    loss, lse, z_term, kl, lse_base, grad_h, grad_w, grad_b = flce.fused_linear_cross_entropy_kl_forward(
        hidden[:0], base[:0], weight, b, labels[:0], kl_beta=0.5)
    assert loss.numel() == kl.numel() == lse_base.numel() == 0 and grad_h.shape == (0, 48)
    assert torch.count_nonzero(grad_w) == 0 and torch.count_nonzero(grad_b) == 0


def test_kl_dispatch_eval_and_autograd_corners():
    hidden, base, weight, b, labels, kl_mask = _kl_inputs(seed=8)
    kw = dict(base_hidden=base, kl_beta=0.5, kl_mask=kl_mask, return_kl=True)
    # auto on CPU tensors: the reference; the override: the kernel
    from fastsft import kernel_usage

    fused_linear_cross_entropy(hidden, weight, labels, b, **kw)
    assert kernel_usage.snapshot()["loss"]["path"] == ("native" if CUDA else "reference")
    kernel_usage.reset()
    _kernel(hidden, weight, labels, b, **kw)
    assert kernel_usage.snapshot()["loss"]["path"] == "native"
    # eval: no autograd Function, the same numbers
    for opts in ({}, {"reduction": "none", "softcap": 2.0}):
        with torch.no_grad():
            got = _kernel(hidden, weight, labels, b, **kw, **opts)
        want = kl_reference(hidden.double(), weight.double(), labels, b.double(), base_hidden=base.double(),
                            kl_beta=0.5, kl_mask=kl_mask, return_z_loss=False, **opts)
        for a, w in zip(got, want):
            torch.testing.assert_close(a.double(), w, atol=1e-5, rtol=1e-5)
            assert not a.requires_grad
    # gradients in the forward: one backward only; the base gets no gradient (it is detached)
    h, hb = hidden.clone().requires_grad_(), base.clone().requires_grad_()
    loss, _ = _kernel(h, weight, labels, b, **dict(kw, base_hidden=hb))
    loss.backward(retain_graph=True)
    assert hb.grad is None
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    with pytest.raises(ValueError, match="h_base must not require grad"):
        flce.FusedLinearCrossEntropyFunction.apply(h, weight, b, labels.clamp_min(-1), 1.0, {"kl_beta": 0.5}, hb)


@cuda_only
@pytest.mark.parametrize("opts", [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}],
                         ids=_ids)
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_kl_bf16_no_worse_than_torch(opts, trainable):
    hidden, base, weight, b, labels, kl_mask = _kl_inputs(n=64, v=300, masked=0.3, seed=8)
    opts = dict(opts, kl_beta=0.7, kl_mask=kl_mask)
    grad_out = torch.randn(64, device=DEVICE) if opts.get("reduction") == "none" else torch.tensor(1.0, device=DEVICE)
    ref, ref_grads = _kl_run(kl_reference, _leaves((hidden, weight, b), torch.float64, trainable), base.double(),
                             labels, opts, grad_out.double())
    tb, tb_grads = _kl_run(kl_reference, _leaves((hidden, weight, b), torch.bfloat16, trainable), base.bfloat16(),
                           labels, opts, grad_out)
    got, got_grads = _kl_run(_kernel, _leaves((hidden, weight, b), torch.bfloat16, trainable), base.bfloat16(),
                             labels, opts, grad_out)
    for g, t, r in zip(got, tb, ref):
        assert _err(g, r) <= 2 * _err(t, r) + 1e-2
    for g, t, r in zip(got_grads, tb_grads, ref_grads):
        if r is not None:
            assert g.dtype == torch.bfloat16 and _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item()


@cuda_only
def test_kl_cuda_default_tiles_large_vocab(monkeypatch):
    monkeypatch.undo()  # real MAX_BLOCK_V and chunking
    _check_kl({"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, n=256, d=64, v=50257, atol=2e-5)
