"""Fused linear cross-entropy on the GPU: chunked logits with the gradient computed in the forward.

    z_i    = softcap(h_i W^T + b)                                  softcap(x) = t * tanh(x / t), optional
    lse_i  = log sum_j exp(z_ij)
    loss_i = (1 - eps) (lse_i - z_i[y_i]) + eps (lse_i - mean_j z_ij) + s lse_i^2
    dloss_i / dz_ij = (1 + 2 s lse_i) softmax(z_i)_j - (1 - eps) [j == y_i] - eps / V
                      (times 1 - tanh^2(x_ij / t) to go through the soft cap)

with eps the label smoothing and s the z-loss weight. Rows are the kept (non-ignored) rows only:
``fastsft.loss`` compacts the others away before anything here runs.

KL anchor to a base model (``h_base``, beta = ``kl_beta``; the HAS_BASE variant of the same row kernel):

    z_base,i = softcap(h_base,i W^T + b)                           a constant: no gradient to the base
    kl_i     = KL(p_base,i || p_i) = sum_j p_base,ij (z_base,ij - z_ij) - lse_base,i + lse_i
    loss_i   = [y_i >= 0] CE_i (z-loss included) + beta kl_i
    dloss_i / dz_ij = [y_i >= 0] (the CE gradient above) + beta (p_ij - p_base,ij)
                      (times 1 - tanh^2(x_ij / t) as well: the cap is the tuned logits')

A row whose target is -1 (a prompt token that ``kl_mask`` keeps) carries the KL term only. Without a
base (or with beta = 0, which ``fastsft.loss`` sends down the plain path) nothing here changes: the
plain launchers run HAS_BASE=False, the code and chunking of before.

Algorithm. For each chunk of C rows: ``z = h_c W^T (+ b)`` with a cuBLAS matmul in the input dtype
(fp32 accumulation inside), then one Triton program per row walks V in BLOCK_V tiles twice: pass 1 is
an online max / sum-exp in float32 (-> lse, loss, z-loss term), pass 2 overwrites ``z`` in place with
``dloss/dz``. Two more matmuls turn that into ``grad_h_c = dz W`` and ``grad_W += dz^T h_c``
(``grad_b += sum_rows dz``). The gradients are kept until autograd asks for them; the backward only
multiplies them by ``scale * grad_output`` (scale = 1/n_kept, 1 or 1/num_items; with a base, "mean"
divides by the labelled rows).

With a base, a second matmul fills a second chunk buffer with ``z_base = h_base_c W^T (+ b)`` (same
dtype), and the row kernel reads both: pass 1 keeps the online (max, sum-exp) of z and of z_base, and
``a = sum_j exp(z_base_j - m_base) (z_base_j - z_j)``, rescaled by ``exp(m_base_old - m_base_new)``
whenever the base's running max moves, so ``kl = a / l_base - lse_base + lse`` in one read of each;
pass 2 writes the gradient above into z's buffer (z_base is only read). The tile is half as wide
(MAX_BLOCK_V / 2), so two live tiles hold what one did. Chunk rows are halved too.

Budget (N kept rows, vocabulary V, hidden D, s bytes per element of the input dtype):

    matmul FLOPs      6 N V D with a trainable head (logits, grad_h, grad_W), 4 N V D frozen: the floor.
                      A blockwise-recompute scheme (Cut Cross-Entropy; the reference in ``fastsft.loss``
                      for reduction="none") does 8 N V D.
    logits traffic    the matmul writes C V, the row kernel reads C V twice and writes C V, the two
                      gradient matmuls read C V: about 6 N V s bytes in all. N=16k, V=152k, D=2048,
                      bf16: 30 GB (~9 ms at 3.3 TB/s) against 3.1e13 FLOPs (~45 ms at ~700 TFLOP/s),
                      so the target is >= ~80 % of the matmul floor.
    extra memory      by arithmetic (no GPU has run it yet; ``bench_fused_linear_cross_entropy.py``
                      measures it there): one chunk of logits, C V s <= CHUNK_BYTES (256 MiB), freed
                      before the forward returns; the finished gradients, grad_h (N D s) and grad_W
                      (V D s), held from the forward to the backward (they exist at the activation peak,
                      the price of not recomputing the logits; a frozen head holds only grad_h); with a
                      16-bit trainable head a float32 grad_W accumulator of V D 4 bytes in the forward,
                      whose rounding to the weight dtype is its last peak, V D (4 + s) bytes, after the
                      chunk is freed (``accumulate_in_fp32=False`` drops it and accumulates in the weight
                      dtype). ``fastsft.loss`` adds, when rows are masked, the packed kept rows (N D s)
                      and the scatter of grad_h back to every row (N_all D s); with none masked, nothing.
                      N=16k (none masked), D=2048, V=152k, bf16: 0.34 GB frozen (the 268 MB chunk and
                      67 MB of grad_h), 1.9 GB trainable (grad_h, the 1.24 GB accumulator and the
                      0.62 GB grad_W, once the chunk is freed; 2.2 GB before it was freed first).
                      torch 2.13's chunked F.linear_cross_entropy with its CUDA defaults ("compact":
                      float32 logits of next_pow2(N / ceil(V / D)) / 2 = 128 rows, a bf16 copy of them,
                      grad_W accumulated in bf16 by addmm_) comes to about 0.18 GB frozen and 0.81 GB
                      trainable there, from its source: the 256 MiB chunk and the float32 accumulator
                      are what this kernel spends above it. CHUNK_BYTES is to be tuned on the GPU (it
                      sets the grad_W GEMM's depth); the accumulator is the precision choice above.
    with a base       matmul FLOPs +2 N V D (the base logits; +4 N V D for reduction="none", whose
                      backward recomputes them), logits traffic about +3 N V s (written once, read in
                      each pass). Extra memory: two chunks of logits of C/2 rows each (``_kl_chunk_rows``),
                      together still <= CHUNK_BYTES, i.e. the same as plain CE (the bound is 2x: two
                      full chunks; halving the rows keeps it at 1x); plus the caller's h_base rows
                      (N D s) and per-row kl / lse_base (8 N bytes), and for reduction="none" h_base and
                      lse_base saved for the backward.

The stored gradients are those of the *sum* of the row losses; the reduction scale is applied in the
backward together with grad_output (in float32). Applying 1/N inside the kernel instead would round
p_j / N to fp16 before a GradScaler could lift it, and flush most of the vocabulary to zero.

``reduction="none"`` cannot know its per-row weights in the forward: the forward runs the kernel
without gradients (COMPUTE_GRAD=False) and saves lse; the backward recomputes each chunk's logits and
runs the same kernel with the incoming grad_output rows as per-row scales (4 N V D + 2 N V D). With a
base it saves lse_base too and recomputes the base logits as well (LSE_GIVEN reads both).

Reference: the plain PyTorch implementation with the same signature is
``fastsft.loss.fused_linear_cross_entropy`` (forced with ``fastsft.loss.use_implementation``); it is
the CPU path and the oracle in ``tests/kernels/test_fused_linear_cross_entropy.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One chunk of logits (C rows x V, input dtype) stays under this many bytes. 256 MiB gives C ~ 880
# rows at V=152k in bf16: enough rows that the logits and grad_h GEMMs run at full cuBLAS speed, and the
# grad_W GEMM (reduction depth C, which reads and writes the V x D fp32 accumulator every chunk, about
# C/4 FLOP per byte) sits near an H100's compute/bandwidth balance, while a 24 GB card keeps room for
# activations. Larger is (slightly) faster, smaller saves memory; tune on the GPU.
CHUNK_BYTES = 256 * 1024 * 1024

# Widest V tile a program loads at once. 4096 values over 8 warps (256 threads) is 16 a thread: 16-byte
# loads with several in flight per thread, and no spills (compiled for sm_90 with every option on: 72
# registers, no local memory, so 3 programs fit an SM; 8192 needs 114-128). At V=152k a row is ~38 tiles
# a pass. Not yet tuned on a GPU. Tests lower it to run several (ragged) tiles in the interpreter.
# With a base (HAS_BASE) the tile is MAX_BLOCK_V / 2 = 2048 over 8 warps: 8 values a thread of each of
# the two rows (logits, base logits), 16 in flight as here; compiled for sm_90: 31-56 registers over
# every captured specialisation (48 at most at this width), no spills (the full 4096 would need up to 80).
MAX_BLOCK_V = 4096


def _chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: C V elements of ``dtype`` within CHUNK_BYTES, at least one row."""
    return max(1, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))


def _kl_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk with a base model: half of :func:`_chunk_rows`, so that the two chunks of logits
    (the tuned model's and the base's) together stay within CHUNK_BYTES."""
    return max(1, _chunk_rows(vocab, dtype) // 2)


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _tanh(x):
    # tl has no tanh that runs everywhere (the interpreter included); exact to ~1e-7 absolute,
    # saturates cleanly: exp overflow gives 1, underflow gives -1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _cross_entropy_rows_kernel(
    # Pointers
    logits_ptr,  # (n, V) logits; overwritten with dloss/dlogits when COMPUTE_GRAD
    targets_ptr,  # (n,) integer labels
    scale_ptr,  # float32, per row (stride_scale=1) or one value (stride_scale=0): multiplies the grads
    loss_ptr,  # (n,) float32 out: the row loss, z-loss term included
    lse_ptr,  # (n,) float32 out, or in when LSE_GIVEN
    z_term_ptr,  # (n,) float32 out: s * lse^2
    base_ptr,  # HAS_BASE: (n, V) base-model logits, same dtype and row stride as logits (read only)
    kl_ptr,  # HAS_BASE: (n,) float32 out: KL(p_base || p)
    lse_base_ptr,  # HAS_BASE: (n,) float32 out, or in when LSE_GIVEN: the base's log-sum-exp
    # Strides and sizes
    stride_row,
    stride_scale,
    V,
    # Loss options
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    kl_beta,
    # Meta-parameters
    BLOCK_V: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    LSE_GIVEN: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BASE: tl.constexpr,
):
    """One program per row: loss, lse and z-loss term, then (optionally) dloss/dz in place.

    HAS_BASE adds kl_beta * KL(p_base || p) to every row (a row whose target is negative or ignore_index
    then carries the KL term only) and writes the KL and lse_base; False is the plain CE code, unchanged.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    y = tl.load(targets_ptr + row)
    valid = y != ignore_index  # rows arrive compacted; this only guards direct callers
    if HAS_BASE:
        valid = valid & (y >= 0)  # -1: a KL-only row (a prompt token kl_mask keeps)
        base_row_ptr = base_ptr + row * stride_row

    if LSE_GIVEN:
        lse = tl.load(lse_ptr + row)
        if HAS_BASE:
            lse_b = tl.load(lse_base_ptr + row)
    else:
        # ---- pass 1: online max / sum-exp in float32 (and the base's, with the p_base-weighted
        # sum of z_base - z that the KL needs, rescaled as the base's running max moves)
        m = float("-inf")
        l = 0.0
        z_sum = 0.0
        if HAS_BASE:
            m_b = float("-inf")
            l_b = 0.0
            a_b = 0.0  # sum_j exp(z_base_j - m_b) (z_base_j - z_j)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            if HAS_BASE:
                zb = tl.load(base_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    zb = softcap * _tanh(zb / softcap)
                diff = zb - z  # 0 past V (both loaded as 0): no -inf - -inf below
                zb = tl.where(mask, zb, float("-inf"))
                mb_new = tl.maximum(m_b, tl.max(zb, axis=0))
                eb = tl.exp(zb - mb_new)
                alpha = tl.exp(m_b - mb_new)
                l_b = l_b * alpha + tl.sum(eb, axis=0)
                a_b = a_b * alpha + tl.sum(eb * diff, axis=0)
                m_b = mb_new
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every tile has a column < V
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = m + tl.log(l)

        z_y = tl.load(row_ptr + y, mask=valid, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z_y = softcap * _tanh(z_y / softcap)
        loss = lse - z_y
        if HAS_SMOOTHING:
            # torch's definition: (1 - eps) * nll + eps * mean_j(lse - z_j)
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / V)
        z_term = 0.0
        if HAS_Z_LOSS:
            z_term = z_loss * lse * lse
        if HAS_BASE:
            lse_b = m_b + tl.log(l_b)
            kl = a_b / l_b - lse_b + lse  # sum_j p_base_j (z_base_j - z_j) - lse_base + lse
            tl.store(loss_ptr + row, tl.where(valid, loss + z_term, 0.0) + kl_beta * kl)
            tl.store(kl_ptr + row, kl)
            tl.store(lse_base_ptr + row, lse_b)
        else:
            tl.store(loss_ptr + row, tl.where(valid, loss + z_term, 0.0))
        tl.store(lse_ptr + row, lse)
        tl.store(z_term_ptr + row, tl.where(valid, z_term, 0.0))

    if COMPUTE_GRAD:
        # ---- pass 2: dloss/dz = (1 + 2 s lse) p - (1 - eps) onehot(y) - eps / V, in place
        # (HAS_BASE: that on labelled rows, 0 on KL-only ones, plus beta (p - p_base) on every row)
        scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        p_coef = 1.0
        if HAS_Z_LOSS:
            p_coef = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            p = tl.exp(z - lse)
            g = p_coef * p - tl.where(cols == y, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                g -= label_smoothing / V
            if HAS_BASE:
                zb = tl.load(base_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    zb = softcap * _tanh(zb / softcap)
                g = tl.where(valid, g, 0.0) + kl_beta * (p - tl.exp(zb - lse_b))
            if HAS_SOFTCAP:
                g *= 1.0 - t * t  # the KL's gradient goes through the tuned model's cap too
            if HAS_BASE:
                g = g * scale  # every row has a fresh lse (the KL needs it)
            else:
                g = tl.where(valid, g * scale, 0.0)  # where, not *0: a stale lse can make g inf
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: torch.Tensor | float = 1.0,
    lse: torch.Tensor | None = None,
    compute_grad: bool = False,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    block_v: int | None = None,
    base: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    lse_base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Row-wise cross-entropy of ``logits`` (n, V) against ``targets`` (n,), math in float32.

    Returns ``(loss, lse, z_term)``, each (n,) float32 (``loss`` includes ``z_term``). With
    ``compute_grad`` the logits are overwritten with ``scale * dloss/dlogits`` (``scale``: one number or
    (n,) per-row weights). With ``lse`` given (the forward's), pass 1 is skipped and ``loss``/``z_term``
    are left unwritten (empty).

    ``base``: the base model's logits (n, V), same dtype and layout, read only. Each row's loss then adds
    ``kl_beta * KL(p_base || p)``; a row whose target is negative (or ``ignore_index``) carries that term
    only (no CE, no z-loss). Returns ``(loss, lse, z_term, kl, lse_base)``; with ``lse`` given,
    ``lse_base`` (the forward's) must be given too and ``kl`` is left unwritten.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with contiguous rows, got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    has_base = base is not None
    if has_base and (base.shape != logits.shape or base.stride() != logits.stride() or base.dtype != logits.dtype):
        raise ValueError(f"base logits {tuple(base.shape)} {base.dtype} stride {base.stride()} must match the "
                         f"logits {tuple(logits.shape)} {logits.dtype} stride {logits.stride()}")
    loss = logits.new_empty(n, dtype=torch.float32)
    z_term = logits.new_empty(n, dtype=torch.float32)
    lse_given = lse is not None
    lse = lse.float().contiguous() if lse_given else logits.new_empty(n, dtype=torch.float32)
    if has_base:
        if lse_given and lse_base is None:
            raise ValueError("lse given without lse_base: the KL's gradient needs the forward's lse_base too")
        kl = logits.new_empty(n, dtype=torch.float32)
        lse_base = lse_base.float().contiguous() if lse_given else logits.new_empty(n, dtype=torch.float32)
    out = (loss, lse, z_term, kl, lse_base) if has_base else (loss, lse, z_term)
    if n == 0:
        return out
    if isinstance(scale, torch.Tensor) and scale.numel() == n and n != 1:
        scale_t, stride_scale = scale.float().contiguous(), 1
    else:  # one value for every row
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=logits.device).reshape(1)
        stride_scale = 0
    # with a base, two tiles (logits and base logits) are live at once: half the width keeps the values a
    # thread holds (and its registers) about where the plain kernel's are
    block = block_v or min(MAX_BLOCK_V // (2 if has_base else 1), triton.next_power_of_2(vocab))
    # 8 warps for the widest tiles (16 values a thread); 4 warps at 4096 would need 96-123 registers
    num_warps = 8 if block >= 2048 else 4
    _cross_entropy_rows_kernel[(n,)](
        logits, targets.contiguous(), scale_t, loss, lse, z_term,
        # without a base these three are never read or written: any pointers of the right kind do
        base if has_base else logits, kl if has_base else loss, lse_base if has_base else lse,
        logits.stride(0), stride_scale, vocab,
        ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0), float(kl_beta),
        BLOCK_V=block,
        COMPUTE_GRAD=compute_grad,
        LSE_GIVEN=lse_given,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z_LOSS=z_loss > 0.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_BASE=has_base,
        num_warps=num_warps,
    )
    return out


_ADDMM_FP32_OUT = True  # cleared the first time cuBLAS refuses a 16-bit x 16-bit -> fp32 addmm


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32 and ``a``, ``b`` 16-bit."""
    global _ADDMM_FP32_OUT
    if acc.is_cuda and _ADDMM_FP32_OUT:
        try:  # the product stays in fp32 from cuBLAS's accumulator to acc: no rounding to 16 bits
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            return
        except (RuntimeError, NotImplementedError):
            _ADDMM_FP32_OUT = False
    # fallback: 16-bit product a block of rows at a time (a temporary of at most CHUNK_BYTES), added in
    # fp32: add_ upcasts element by element, so no float32 copy of the block is made
    step = max(1, CHUNK_BYTES // (b.shape[1] * b.element_size()))
    for s in range(0, acc.shape[0], step):
        acc[s : s + step].add_(a[s : s + step] @ b)


def _chunked_logits_and_grads(h, weight, bias, targets, *, need, scale, lse, accumulate_in_fp32,
                              chunk_rows, block_v, h_base=None, kl_beta=0.0, lse_base=None, **ce):
    """The chunk loop shared by forward and backward, with or without a base; see the module docstring.

    Returns ``(loss, lse, z_term, kl, lse_base, grad_h, grad_W, grad_b)`` (``kl``/``lse_base`` None
    without ``h_base``)."""
    n, vocab = h.shape[0], weight.shape[0]
    need_h, need_w, need_b = need
    compute_grad = need_h or need_w or need_b
    has_base = h_base is not None
    losses = h.new_empty(n, dtype=torch.float32)
    lse_out = h.new_empty(n, dtype=torch.float32)
    z_terms = h.new_empty(n, dtype=torch.float32)
    kls = h.new_empty(n, dtype=torch.float32) if has_base else None
    lse_base_out = h.new_empty(n, dtype=torch.float32) if has_base else None
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = grad_b = None
    if need_w:
        acc_dtype = torch.float32 if accumulate_in_fp32 else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
    if need_b:
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=bias.device)
    step = chunk_rows or (_kl_chunk_rows if has_base else _chunk_rows)(vocab, h.dtype)
    z_buf = h.new_empty(min(step, n), vocab)  # the only [rows x V] memory (two with a base)
    zb_buf = torch.empty_like(z_buf) if has_base else None

    def logits(x, out):
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)

    for s in range(0, n, step):
        hc, yc = h[s : s + step], targets[s : s + step]
        z = z_buf[: hc.shape[0]]
        logits(hc, z)
        sc = scale if not isinstance(scale, torch.Tensor) or scale.dim() == 0 else scale[s : s + step]
        base = {}
        if has_base:
            zb = zb_buf[: hc.shape[0]]
            logits(h_base[s : s + step], zb)
            base = dict(base=zb, kl_beta=kl_beta, lse_base=None if lse_base is None else lse_base[s : s + step])
        out = cross_entropy_rows(
            z, yc, scale=sc, lse=None if lse is None else lse[s : s + step], compute_grad=compute_grad,
            block_v=block_v, **base, **ce,
        )
        if lse is None:
            losses[s : s + step], lse_out[s : s + step], z_terms[s : s + step] = out[:3]
            if has_base:
                kls[s : s + step], lse_base_out[s : s + step] = out[3:]
        if not compute_grad:
            continue
        # z now holds dloss/dz (c, V)
        if need_h:
            torch.mm(z, weight, out=grad_h[s : s + step])
        if need_w:
            if grad_w.dtype == z.dtype:
                grad_w.addmm_(z.t(), hc)
            else:
                _addmm_fp32_(grad_w, z.t(), hc)
        if need_b:
            grad_b += z.sum(0, dtype=torch.float32)
    # the chunk buffers go before the float32 grad_W accumulator is rounded to a 16-bit copy: the two
    # V x D tensors, not the chunks too, are the forward's last peak
    z_buf = zb_buf = z = zb = base = None
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return losses, lse_out, z_terms, kls, lse_base_out, grad_h, grad_w, grad_b


def fused_linear_cross_entropy_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    need: tuple[bool, bool, bool] = (True, True, True),
    accumulate_in_fp32: bool = True,
    chunk_rows: int | None = None,
    block_v: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    """Row losses of ``h @ weight.T (+ bias)`` against ``targets``, and the gradients named in ``need``.

    h: (n, D) kept rows; weight: (V, D); bias: (V,) or None; targets: (n,).
    ``need``: which of (grad_h, grad_W, grad_b) to compute; all False runs the kernel without its
    gradient pass and skips every gradient matmul. Returns ``(loss, lse, z_term, grad_h, grad_W,
    grad_b)``: the first three (n,) float32, the gradients those of ``loss.sum()`` (None where not
    needed), in the dtypes of ``h``, ``weight``, ``bias``. ``accumulate_in_fp32``: sum grad_W over chunks
    in a float32 buffer (V D 4 bytes) when the weight is 16-bit; False accumulates in the weight dtype.
    """
    loss, lse, z_term, _, _, *grads = _chunked_logits_and_grads(
        h, weight, bias, targets, need=need, scale=1.0, lse=None, accumulate_in_fp32=accumulate_in_fp32,
        chunk_rows=chunk_rows, block_v=block_v, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )
    return (loss, lse, z_term, *grads)


def fused_linear_cross_entropy_backward(
    grad_rows: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    *,
    need: tuple[bool, bool, bool] = (True, True, True),
    accumulate_in_fp32: bool = True,
    chunk_rows: int | None = None,
    block_v: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    """Gradients of ``sum_i grad_rows[i] * loss_i`` by recomputing each chunk's logits.

    ``lse``: the forward's (n,) float32 log-sum-exp. Returns ``(grad_h, grad_W, grad_b)``.
    """
    *_, grad_h, grad_w, grad_b = _chunked_logits_and_grads(
        h, weight, bias, targets, need=need, scale=grad_rows.float(), lse=lse,
        accumulate_in_fp32=accumulate_in_fp32, chunk_rows=chunk_rows, block_v=block_v,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )
    return grad_h, grad_w, grad_b


def _check_base(h, h_base, kl_beta):
    if h_base.shape != h.shape or h_base.dtype != h.dtype:
        raise ValueError(f"h_base {tuple(h_base.shape)} {h_base.dtype} must match h {tuple(h.shape)} {h.dtype}")
    if not kl_beta >= 0.0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")


def fused_linear_cross_entropy_kl_forward(
    h: torch.Tensor,
    h_base: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    kl_beta: float,
    need: tuple[bool, bool, bool] = (True, True, True),
    accumulate_in_fp32: bool = True,
    chunk_rows: int | None = None,
    block_v: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    """:func:`fused_linear_cross_entropy_forward` with the KL anchor to a base model.

    ``h_base``: the base model's hidden states for the same rows (n, D), h's dtype, no gradient. Row i's
    loss is ``CE_i + kl_beta * KL(p_base,i || p_i)``, with no CE (nor z-loss) on rows whose target is
    negative or ``ignore_index`` (KL-only rows). Returns ``(loss, lse, z_term, kl, lse_base, grad_h,
    grad_W, grad_b)``; ``kl`` is the unweighted per-row KL. Chunks hold half the rows of the plain path
    (two chunks of logits: the same extra memory); ``chunk_rows`` overrides that.
    """
    _check_base(h, h_base, kl_beta)
    return _chunked_logits_and_grads(
        h, weight, bias, targets, need=need, scale=1.0, lse=None, accumulate_in_fp32=accumulate_in_fp32,
        chunk_rows=chunk_rows, block_v=block_v, h_base=h_base, kl_beta=float(kl_beta),
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )


def fused_linear_cross_entropy_kl_backward(
    grad_rows: torch.Tensor,
    h: torch.Tensor,
    h_base: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    lse_base: torch.Tensor,
    *,
    kl_beta: float,
    need: tuple[bool, bool, bool] = (True, True, True),
    accumulate_in_fp32: bool = True,
    chunk_rows: int | None = None,
    block_v: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    """Gradients of ``sum_i grad_rows[i] * loss_i`` (loss with the KL anchor) by recomputing each chunk's
    logits and base logits; ``lse``, ``lse_base``: the forward's. Returns ``(grad_h, grad_W, grad_b)``.
    """
    _check_base(h, h_base, kl_beta)
    *_, grad_h, grad_w, grad_b = _chunked_logits_and_grads(
        h, weight, bias, targets, need=need, scale=grad_rows.float(), lse=lse,
        accumulate_in_fp32=accumulate_in_fp32, chunk_rows=chunk_rows, block_v=block_v, h_base=h_base,
        kl_beta=float(kl_beta), lse_base=lse_base, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------
# autograd


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(h, weight, bias, targets, scale, options) -> (loss, z_term)``, or with a base model
    ``apply(h, weight, bias, targets, scale, options, h_base) -> (loss, z_term, kl)``.

    ``scale`` a float or 0-dim tensor: ``loss = scale * sum_i loss_i`` (and the z-loss and KL terms
    reduced the same way), gradients computed in the forward. ``scale=None``: per-row ``(loss_i, z_i)``
    (and ``kl_i``), gradients recomputed in the backward. ``options``: keywords of
    :func:`fused_linear_cross_entropy_forward` (``ignore_index``, ``label_smoothing``, ``z_loss``,
    ``softcap``, ``accumulate_in_fp32``, ``chunk_rows``, ``block_v``), plus ``kl_beta`` with a base.
    ``h_base`` (no gradient: the base is a constant) selects the KL variant of the kernel; None is the
    plain CE path, unchanged. The z-loss and KL terms are not differentiable (metrics; their gradients
    are part of the loss's).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, scale, options, h_base=None):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.options, ctx.scale, ctx.per_row, ctx.used = options, scale, scale is None, False
        has_base = h_base is not None
        if has_base:
            if ctx.needs_input_grad[6]:
                raise ValueError("h_base must not require grad: no gradient reaches the base model (detach it)")
            _check_base(h, h_base, options.get("kl_beta", 0.0))
        if scale is None:
            losses, lse, z_terms, kls, lse_base, *_ = _chunked_logits_and_grads(
                h, weight, bias, targets, need=(False, False, False), scale=1.0, lse=None,
                **_loop_options(options, h_base))
            ctx.save_for_backward(h, weight, bias, targets, lse, h_base, lse_base)
        else:
            losses, _, z_terms, kls, _, grad_h, grad_w, grad_b = _chunked_logits_and_grads(
                h, weight, bias, targets, need=need, scale=1.0, lse=None, **_loop_options(options, h_base))
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            losses, z_terms = losses.sum() * scale, z_terms.sum() * scale
            kls = kls.sum() * scale if has_base else None
        if not has_base:
            ctx.mark_non_differentiable(z_terms)
            return losses, z_terms
        ctx.mark_non_differentiable(z_terms, kls)
        return losses, z_terms, kls

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        need = tuple(ctx.needs_input_grad[:3])
        if ctx.per_row:
            h, weight, bias, targets, lse, h_base, lse_base = ctx.saved_tensors
            *_, grad_h, grad_w, grad_b = _chunked_logits_and_grads(
                h, weight, bias, targets, need=need, scale=grad_loss.float(), lse=lse, lse_base=lse_base,
                **_loop_options(ctx.options, h_base))
            return grad_h, grad_w, grad_b, None, None, None, None
        if ctx.used:  # the stored gradients were scaled in place by the first backward
            raise RuntimeError("fused linear cross-entropy computes its gradients in the forward; "
                               "it cannot be backpropagated twice (retain_graph)")
        ctx.used = True
        factor = grad_loss.float() * ctx.scale  # float32 0-dim: d total / d (sum of row losses)
        grads = [None if g is None else g.mul_(factor) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)


def _loop_options(options: dict, h_base) -> dict:
    """``options`` as :func:`_chunked_logits_and_grads` keywords: defaults filled in, the base's added."""
    opts = dict(accumulate_in_fp32=True, chunk_rows=None, block_v=None)
    opts.update(options)
    kl_beta = opts.pop("kl_beta", 0.0)
    if h_base is not None:
        opts.update(h_base=h_base, kl_beta=float(kl_beta))
    return opts


# ----------------------------------------------------------------------------------------------------
# reference: the plain PyTorch implementation (blockwise recompute) is fastsft.loss.fused_linear_cross_entropy,
# forced with ``fastsft.loss.use_implementation("reference")``; it is not duplicated here.
