"""Fused LoRA projections whose frozen base weight is re-materialised in the backward, never saved.

One projection (``s`` the LoRA scaling, ``D`` the LoRA dropout, ``W`` frozen, ``b`` frozen)::

    Y  = X W^T + b + s (D(X) A^T) B^T
    dX = dY W + s ((dY B) A) * D'            D' = keep / (1 - p): the dropout's own derivative
    dA = s (dY B)^T D(X)
    dB = s dY^T (D(X) A^T)                   D(X) A^T is recomputed from X, not saved

``W`` comes from a *weight provider*: a dense frozen tensor, an object with ``dequantize()`` (an NF4
base layer) or a zero-argument callable returning ``[out, in]``. The provider is called once in the
forward and once more in the backward, and the dense ``W`` lives only while its matmul runs. Plain
autograd over ``F.linear(x, dequantize(), b)`` instead saves the dequantized ``W`` for ``dX``: one
dense copy of every adapted matrix held from forward to backward, i.e. the whole model in bf16 at the
activation peak, which is what QLoRA is meant to avoid.

The blocks fuse a decoder layer's projections over the parameters of the separate ``LoRALinear``
modules (same ``lora_A``/``lora_B`` tensors, so the PEFT adapter file does not depend on the path):

    lora_qkv   q, k, v = P_q(X), P_k(X), P_v(X); one autograd node, dX accumulated once.
    lora_mlp   Y = P_down(silu(G) * U), G = P_gate(X), U = P_up(X); ``silu(G) * U`` is recomputed in
               the backward from the saved pre-activations.

Saved tensors (N tokens, s bytes per element, h hidden, i intermediate, r rank):

    lora_linear / lora_qkv   X (N h s; usually the same storage the producer of X already keeps), the
                             A/B parameters (references), and with dropout one bool keep-mask per
                             projection (N h bytes each). Plain autograd: X, D(X) (N h s) and its
                             mask per projection, X A^T (N r s) per projection, and the dense W.
    lora_mlp                 X, G, U: N (h + 2 i) s, plus with dropout bool masks of N h (gate),
                             N h (up), N i (down) bytes. Plain autograd: X, G, silu(G), U,
                             silu(G) * U: N (h + 4 i) s, the dropped inputs and masks, 3 dense W.

Dropout: the mask is drawn in the forward as ``F.dropout(ones_like(x))`` (the same RNG draws, in the
same order gate/up/down or q/k/v, as the separate modules' ``F.dropout(x)``, so a seeded reference
matches), and saved as a bool mask (1 byte per element) rather than the dropped input (s bytes).

Dtypes are those of plain autograd over ``LoRALinear`` (so the two paths agree for every weight dtype x
autocast the config allows): under autocast everything computes in autocast's dtype (bf16 projections
of a float32 or float16 x); without it the base computes in x's dtype and the LoRA branch in the
factors' (float32 factors beside a bf16 base: a float32 branch, rounded once when added). Autocast is
switched off inside the Functions and every cast is explicit, so in-place ops never meet operands that
autocast left in another dtype. ``dx`` is summed in x's dtype (float32 for a float32 stream) and comes
back in it; the gradients of A and B come back in their own dtype. The SwiGLU derivative is evaluated in
float32.

These are plain torch matmuls: the win is memory (no dense W saved, no LoRA intermediates saved, no
SwiGLU output saved) and one node per block. A Triton dequantize-into-matmul is future work.

References: Unsloth ``fast_lora`` (LoRA_MLP / LoRA_QKV with re-dequantization in backward), torchtune
``LoRALinear`` (NF4 base + ``(alpha / r) B(A(x))``), the QLoRA paper (Dettmers et al., 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "LoRAProj",
    "lora_proj",
    "lora_linear_forward",
    "lora_linear_backward",
    "swiglu_forward",
    "swiglu_backward",
    "LoRALinearFunction",
    "LoRAMLPFunction",
    "lora_linear",
    "lora_linear_ref",
    "lora_qkv",
    "lora_qkv_ref",
    "lora_mlp",
    "lora_mlp_ref",
]

WeightProvider = Union[torch.Tensor, Callable[[], torch.Tensor], Any]


class LoRAProj(NamedTuple):
    """One adapted projection: its base weight provider, LoRA factors and frozen bias."""

    weight: WeightProvider  # [out, in] tensor, object with dequantize(), or callable
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    bias: Optional[torch.Tensor] = None  # [out]


def lora_proj(module) -> LoRAProj:
    """The :class:`LoRAProj` of a ``fastsft.model.lora.LoRALinear`` (its NF4 base's ``dequantize``
    when it has one, else the dense ``base_layer.weight``)."""
    base = module.base_layer
    deq = getattr(base, "dequantize", None)
    weight = deq if callable(deq) else base.weight
    return LoRAProj(weight, module.lora_A.weight, module.lora_B.weight, getattr(base, "bias", None))


def _materialize(provider: WeightProvider, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The dense frozen ``W`` [out, in] in ``dtype``."""
    if isinstance(provider, torch.Tensor):
        w = provider
    elif callable(getattr(provider, "dequantize", None)):
        w = provider.dequantize()
    elif callable(provider):
        w = provider()
    else:
        raise TypeError(f"weight provider must be a tensor, have dequantize(), or be callable; got {type(provider)}")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight provider gave {got}, expected a tensor of shape {shape}")
    if w.requires_grad:
        raise ValueError("the base weight must be frozen (requires_grad=False): no gradient is computed for it")
    return w.to(dtype)


def _check_bias(bias: Optional[torch.Tensor]) -> None:
    if bias is not None and bias.requires_grad:
        raise ValueError("the base bias must be frozen (requires_grad=False): no gradient is computed for it")


def _dropout_noise(x: torch.Tensor, p: float, training: bool, factors: torch.Tensor,
                   dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``keep / (1 - p)`` in ``dtype`` (the LoRA branch's), or None when dropout is off. Drawn with
    ``F.dropout`` on a ones tensor in the factors' dtype, so the RNG stream is consumed exactly as the
    plain layer's ``F.dropout(x.to(factors.dtype))`` consumes it (before any autocast)."""
    if not training or p == 0.0:
        return None
    return F.dropout(torch.ones(x.shape, dtype=factors.dtype, device=x.device), p, True).to(dtype)


def _noise_from_keep(keep: Optional[torch.Tensor], p: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if keep is None else keep.to(dtype).mul_(1.0 / (1.0 - p))


def _compute_dtypes(x: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(base, LoRA branch) compute dtypes: autocast's for both where autocast is on for x's device (what
    plain autograd under autocast computes), else x's for the base and the factors' own for the branch
    (``LoRALinear`` casts x to the factors' dtype: float32 factors, a float32 branch)."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        return dt, dt
    return x.dtype, lora_a.dtype


def _no_autocast(x: torch.Tensor):
    """Inside the fused Functions every dtype is explicit: autocast would recast some operands and not
    the in-place ones (the fault this guards against: a bf16 ``y`` meeting float32 factors in addmm_)."""
    return torch.autocast(x.device.type, enabled=False)


# ----------------------------------------------------------------------------------------------------
# launchers (2D: x [N, in])


def lora_linear_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    noise: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x W^T + bias + scaling (x * noise) A^T B^T`` -> [N, out] in x's dtype (w in x's dtype too). The
    LoRA branch runs in A's dtype (``noise`` too) and is added once rounded, as ``LoRALinear`` does."""
    y = x @ w.t()  # (N, out)
    if bias is not None:
        y.add_(bias.to(y.dtype))
    xd = x.to(a.dtype) if noise is None else x.to(a.dtype) * noise
    xa = xd @ a.t()  # (N, r), transient
    if a.dtype == y.dtype:
        y.addmm_(xa, b.t(), alpha=scaling)
    else:
        y.add_((xa @ b.t()).mul_(scaling).to(y.dtype))
    return y


def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: Optional[torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    noise: Optional[torch.Tensor],
    dx: Optional[torch.Tensor] = None,
    need_a: bool = True,
    need_b: bool = True,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`lora_linear_forward`: ``(dx, dA, dB)``; dy, x and w in x's dtype, a, b and
    ``noise`` in the branch's.

    ``dx`` is accumulated into the given buffer, of any dtype (a float32 buffer sums half-precision
    contributions without rounding between them), or a new one in x's dtype; it is skipped (None) when
    ``w`` is None. ``x A^T`` is recomputed here rather than saved (N r extra FLOP-cheap work)."""
    xd = x.to(a.dtype) if noise is None else x.to(a.dtype) * noise
    dyl = dy.to(a.dtype)
    dyb = dyl @ b  # (N, r)
    da = (dyb.t() @ xd).mul_(scaling) if need_a else None  # (r, in)
    db = (dyl.t() @ (xd @ a.t())).mul_(scaling) if need_b else None  # (out, r)
    if w is None:
        return dx, da, db
    if dx is None:
        dx = dy @ w  # (N, in)
    elif dx.dtype == dy.dtype:
        dx.addmm_(dy, w)
    else:
        dx.add_(dy @ w)
    if noise is None and a.dtype == dx.dtype:
        dx.addmm_(dyb, a, alpha=scaling)
    else:
        branch = (dyb @ a).mul_(scaling)
        if noise is not None:
            branch.mul_(noise)
        dx.add_(branch.to(dy.dtype))  # rounded to the base's dtype first, as the plain layer's cast does
    return dx, da, db


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u``."""
    return F.silu(g) * u


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` of ``h = silu(g) u``, in float32 then cast:
    ``du = dh silu(g)``, ``dg = dh u sigmoid(g) (1 + g (1 - sigmoid(g)))``."""
    gf = g.float()
    sig = torch.sigmoid(gf)
    dhf = dh.float()
    du = (dhf * gf * sig).to(u.dtype)
    dg = (dhf * u.float() * sig * (1.0 + gf * (1.0 - sig))).to(g.dtype)
    return dg, du


def _dx_buffer(x: torch.Tensor, dt: torch.dtype, need: bool) -> Optional[torch.Tensor]:
    """Where dx is summed: a zeroed buffer in x's dtype when x is wider than the compute dtype (a float32
    stream under bf16 autocast: plain autograd sums the projections' bf16 gradients in float32 too),
    else None (the first projection's dx is the buffer)."""
    if not need or x.dtype == dt:
        return None
    return torch.zeros_like(x)


# ----------------------------------------------------------------------------------------------------
# autograd Functions


class LoRALinearFunction(torch.autograd.Function):
    """One or more LoRA projections of the same 2D input ``x`` [N, in] (one for ``lora_linear``, three
    for ``lora_qkv``). ``lora`` is ``A_1, B_1, A_2, B_2, ...``; returns one output per projection.
    Saves x, the A/B references and (with dropout) one bool keep-mask per projection."""

    @staticmethod
    def forward(ctx, x, weights, biases, scaling, dropout_p, training, *lora):
        n = len(weights)
        dt, lt = _compute_dtypes(x, lora[0])
        outs, keeps = [], []
        with _no_autocast(x):
            xc = x.to(dt)
            for j in range(n):
                a, b = lora[2 * j], lora[2 * j + 1]
                noise = _dropout_noise(x, dropout_p, training, a, lt)
                w = _materialize(weights[j], (b.shape[0], a.shape[1]), dt)
                outs.append(lora_linear_forward(xc, w, biases[j], a.to(lt), b.to(lt), scaling, noise))
                del w  # the dense (dequantized) W is dropped right after its matmul
                keeps.append(None if noise is None else noise != 0)
        ctx.weights, ctx.scaling, ctx.dropout_p, ctx.n, ctx.dtypes = weights, scaling, dropout_p, n, (dt, lt)
        ctx.save_for_backward(x, *lora, *keeps)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        n, (dt, lt) = ctx.n, ctx.dtypes
        saved = ctx.saved_tensors
        x, lora, keeps = saved[0], saved[1 : 1 + 2 * n], saved[1 + 2 * n :]
        need_x = ctx.needs_input_grad[0]
        dx, grads = _dx_buffer(x, dt, need_x), []
        with _no_autocast(x):
            xc = x.to(dt)
            for j in range(n):
                a, b = lora[2 * j], lora[2 * j + 1]
                need_a, need_b = ctx.needs_input_grad[6 + 2 * j], ctx.needs_input_grad[7 + 2 * j]
                w = _materialize(ctx.weights[j], (b.shape[0], a.shape[1]), dt) if need_x else None
                dx, da, db = lora_linear_backward(
                    dys[j].to(dt), xc, w, a.to(lt), b.to(lt), ctx.scaling,
                    _noise_from_keep(keeps[j], ctx.dropout_p, lt), dx, need_a, need_b,
                )
                del w
                grads += [None if da is None else da.to(a.dtype), None if db is None else db.to(b.dtype)]
        return (None if dx is None else dx.to(x.dtype), None, None, None, None, None, *grads)


class LoRAMLPFunction(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with LoRA on all three projections, x 2D [N, h].

    Saves x [N, h], the gate/up pre-activations g, u [N, i], the A/B references and (with dropout) the
    three bool keep-masks; ``silu(g) * u`` is recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, weights, biases, scaling, dropout_p, training, ag, bg, au, bu, ad, bd):
        dt, lt = _compute_dtypes(x, ag)
        lora = ((ag, bg), (au, bu), (ad, bd))
        shapes = [(b.shape[0], a.shape[1]) for a, b in lora]
        with _no_autocast(x):
            noises = [_dropout_noise(x, dropout_p, training, ag, lt), _dropout_noise(x, dropout_p, training, au, lt)]
            xc = x.to(dt)
            w = _materialize(weights[0], shapes[0], dt)
            g = lora_linear_forward(xc, w, biases[0], ag.to(lt), bg.to(lt), scaling, noises[0])  # (N, i)
            w = _materialize(weights[1], shapes[1], dt)
            u = lora_linear_forward(xc, w, biases[1], au.to(lt), bu.to(lt), scaling, noises[1])  # (N, i)
            h = swiglu_forward(g, u)  # (N, i), not saved
            noises.append(_dropout_noise(h, dropout_p, training, ad, lt))
            w = _materialize(weights[2], shapes[2], dt)
            y = lora_linear_forward(h, w, biases[2], ad.to(lt), bd.to(lt), scaling, noises[2])  # (N, h)
            del w, h
        keeps = [None if nz is None else nz != 0 for nz in noises]
        ctx.weights, ctx.shapes, ctx.scaling, ctx.dropout_p = weights, shapes, scaling, dropout_p
        ctx.dtypes = dt, lt
        ctx.save_for_backward(x, g, u, ag, bg, au, bu, ad, bd, *keeps)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, g, u, ag, bg, au, bu, ad, bd, kg, ku, kd = ctx.saved_tensors
        (dt, lt), s, p = ctx.dtypes, ctx.scaling, ctx.dropout_p
        need = ctx.needs_input_grad
        with _no_autocast(x):
            xc = x.to(dt)
            dy = dy.to(dt)
            h = swiglu_forward(g, u)  # recomputed (N, i)
            w = _materialize(ctx.weights[2], ctx.shapes[2], dt)
            dh, dad, dbd = lora_linear_backward(
                dy, h, w, ad.to(lt), bd.to(lt), s, _noise_from_keep(kd, p, lt), None, need[10], need[11]
            )
            del w, h
            dg, du = swiglu_backward(dh, g, u)
            del dh
            need_x = need[0]
            dx = _dx_buffer(x, dt, need_x)
            w = _materialize(ctx.weights[0], ctx.shapes[0], dt) if need_x else None
            dx, dag, dbg = lora_linear_backward(
                dg, xc, w, ag.to(lt), bg.to(lt), s, _noise_from_keep(kg, p, lt), dx, need[6], need[7]
            )
            w = _materialize(ctx.weights[1], ctx.shapes[1], dt) if need_x else None
            dx, dau, dbu = lora_linear_backward(
                du, xc, w, au.to(lt), bu.to(lt), s, _noise_from_keep(ku, p, lt), dx, need[8], need[9]
            )
            del w

        def cast(t, like):
            return None if t is None else t.to(like.dtype)

        return (cast(dx, x), None, None, None, None, None,
                cast(dag, ag), cast(dbg, bg), cast(dau, au), cast(dbu, bu), cast(dad, ad), cast(dbd, bd))


# ----------------------------------------------------------------------------------------------------
# public API


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _check_p(dropout_p: float) -> float:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def lora_linear(
    x: torch.Tensor,
    base_weight_or_provider: WeightProvider,
    bias: Optional[torch.Tensor],
    lora_A_weight: torch.Tensor,
    lora_B_weight: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``F.linear(x, W, bias) + scaling * B(A(dropout(x)))`` [..., out] with W from the provider,
    re-materialised in the backward instead of saved."""
    p = _check_p(dropout_p)
    _check_bias(bias)
    (y,) = LoRALinearFunction.apply(
        _flat(x), (base_weight_or_provider,), (bias,), float(scaling), p, bool(training), lora_A_weight, lora_B_weight
    )
    return y.view(*x.shape[:-1], y.shape[-1])


def _ref_weight(provider: WeightProvider) -> torch.Tensor:
    if isinstance(provider, torch.Tensor):
        return provider
    if callable(getattr(provider, "dequantize", None)):
        return provider.dequantize()
    return provider()


def lora_linear_ref(
    x: torch.Tensor,
    base_weight_or_provider: WeightProvider,
    bias: Optional[torch.Tensor],
    lora_A_weight: torch.Tensor,
    lora_B_weight: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Plain autograd reference for :func:`lora_linear` (saves the dense W, D(x), x A^T)."""
    w = _ref_weight(base_weight_or_provider).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    xd = F.dropout(x, dropout_p, training)
    lora = F.linear(F.linear(xd, lora_A_weight.to(x.dtype)), lora_B_weight.to(x.dtype))
    return F.linear(x, w, b) + scaling * lora


def _three(t: Optional[Sequence], name: str) -> tuple:
    if t is None:
        return (None, None, None)
    if len(t) != 3:
        raise ValueError(f"{name}: expected 3 entries (q, k, v), got {len(t)}")
    return tuple(t)


def lora_qkv(
    x: torch.Tensor,
    weights: Sequence[WeightProvider],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)``, each a :func:`lora_linear` of x, as one autograd node: x is saved once and dx
    is accumulated once across the three projections."""
    p = _check_p(dropout_p)
    weights, biases = _three(weights, "weights"), _three(biases, "biases")
    lora_As, lora_Bs = _three(lora_As, "lora_As"), _three(lora_Bs, "lora_Bs")
    for bias in biases:
        _check_bias(bias)
    lora = [t for ab in zip(lora_As, lora_Bs) for t in ab]
    outs = LoRALinearFunction.apply(_flat(x), weights, biases, float(scaling), p, bool(training), *lora)
    return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in outs)


def lora_qkv_ref(x, weights, biases, lora_As, lora_Bs, scaling, dropout_p=0.0, training=False):
    """Plain autograd reference for :func:`lora_qkv`: three :func:`lora_linear_ref` in q, k, v order."""
    biases = _three(biases, "biases")
    return tuple(
        lora_linear_ref(x, w, b, a, bb, scaling, dropout_p, training)
        for w, b, a, bb in zip(weights, biases, lora_As, lora_Bs)
    )


def _proj(p) -> LoRAProj:
    return p if isinstance(p, LoRAProj) else LoRAProj(*p)


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAProj,
    up: LoRAProj,
    down: LoRAProj,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with each projection a LoRA projection given as a
    :class:`LoRAProj` or a tuple ``(weight provider, lora_A, lora_B[, bias])``. Saves x and the
    gate/up pre-activations; the SwiGLU output is recomputed in the backward."""
    p = _check_p(dropout_p)
    gate, up, down = _proj(gate), _proj(up), _proj(down)
    for pr in (gate, up, down):
        _check_bias(pr.bias)
    y = LoRAMLPFunction.apply(
        _flat(x),
        (gate.weight, up.weight, down.weight),
        (gate.bias, up.bias, down.bias),
        float(scaling), p, bool(training),
        gate.lora_A, gate.lora_B, up.lora_A, up.lora_B, down.lora_A, down.lora_B,
    )
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_mlp_ref(x, gate, up, down, scaling, dropout_p=0.0, training=False):
    """Plain autograd reference for :func:`lora_mlp`."""
    gate, up, down = _proj(gate), _proj(up), _proj(down)

    def proj(t, pr):
        return lora_linear_ref(t, pr.weight, pr.bias, pr.lora_A, pr.lora_B, scaling, dropout_p, training)

    return proj(F.silu(proj(x, gate)) * proj(x, up), down)
