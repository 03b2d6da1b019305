"""fastsft's lean decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3) and its close relatives:
Gemma 1/2/3 (text) and Phi-3 / Phi-4-mini.

The relatives differ from Llama in pieces, each switched on by the config (see ModelConfig's helpers):
Gemma's RMSNorm scales by (1 + w) in float32 and its embeddings by sqrt(hidden); Gemma 2/3 add norms
after attention and around the MLP, scale attention by query_pre_attn_scalar, mix sliding and global
layers (Gemma 3: with their own RoPE bases) and soft-cap logits (Gemma 2: attention scores too); their
MLPs gate with tanh-GELU (GeGLU). Phi-3 fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj
(the names LoRA targets and PEFT keys use), adds residual dropout, and (Phi-4-mini) rotates part of
each head only.

Submodule names mirror transformers' so that state-dict keys match Hugging Face
checkpoints exactly (model.embed_tokens, model.layers.{i}.self_attn.q_proj, ...,
model.norm, lm_head). `CausalLM.forward` returns the final-normed hidden states,
never logits: the loss owns the LM-head matmul (see `CausalLM.logits`).
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastsft import kernel_usage

from .checkpointing import checkpoint_layer
from .config import ModelConfig
from .fused import KernelChoice

__all__ = ["RMSNorm", "RotaryEmbedding", "Attention", "MLP", "DecoderLayer", "Backbone", "CausalLM",
           "build_model", "compute_inv_freq", "rope_attention_factor", "rotate_half", "apply_rotary_pos_emb"]


# --------------------------------------------------------------------------- RoPE
# Every rope type transformers 5 gives the Llama family, computed here and only here (the math of
# transformers.modeling_rope_utils, in the same float32 operations so the two agree to rounding):
#   default   inv_freq_i = theta^(-2i/d)
#   linear    inv_freq / factor
#   llama3    low frequencies / factor, high ones kept, a smooth band between (wavelength vs original ctx)
#   yarn      per-dimension blend of inv_freq and inv_freq / factor (ramp between the beta_fast/beta_slow
#             correction dims), and cos/sin scaled by the attention factor 0.1 ln(factor) + 1 (or mscale's)
#   dynamic   NTK: theta' = theta ((factor L / max_pos) - (factor - 1))^(d / (d - 2)) once L > max_pos
#   longrope  inv_freq / short_factor_i, or / long_factor_i once L > original ctx; cos/sin scaled by
#             sqrt(1 + ln(factor) / ln(original ctx))
# L is a sequence length: the largest position + 1. transformers takes it over the whole batch (its rotary
# module keys on max(position_ids)); fastsft takes it per sequence -- per row, or per packed sequence --
# so a sequence's frequencies are the ones transformers gives it alone, whatever it is batched or packed
# with. The two agree whenever every sequence of a batch is on the same side of the threshold. (transformers'
# dynamic type also keeps the longest L seen across calls until a call falls below max_pos; a forward
# here depends on its own positions only, as a fresh transformers model's first forward does.)
_PER_SEQUENCE_ROPE = ("dynamic", "longrope")


def _yarn_inv_freq(config: ModelConfig) -> torch.Tensor:
    rs, dim, base = config.rope_scaling, config.rotary_dim, config.rope_theta
    factor = rs["factor"]
    original_ctx = rs["original_max_position_embeddings"]
    if factor is None:
        factor = config.max_position_embeddings / original_ctx
    beta_fast = rs.get("beta_fast") or 32  # transformers' defaults (YaRN paper), also for an explicit 0
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dim whose wavelength fits num_rotations times in original_ctx
        return (dim * math.log(original_ctx / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: high-frequency dims, kept (extrapolated); 0: low-frequency dims, interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def _longrope_inv_freq(config: ModelConfig, long: bool) -> torch.Tensor:
    rs, dim = config.rope_scaling, config.rotary_dim
    ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (ext * config.rope_theta ** exponents)


def _dynamic_ntk_inv_freq(config: ModelConfig, seq_len: torch.Tensor) -> torch.Tensor:
    """[..., d/2] for int64 lengths [...]; float32 throughout, as transformers computes it in the forward."""
    dim, max_pos, factor = config.rotary_dim, config.max_position_embeddings, config.rope_scaling["factor"]
    seq_len = seq_len.clamp_min(max_pos)  # within max_pos the base stays theta (callers pick plain RoPE there)
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
    return 1.0 / (base[..., None] ** exponents)


def _per_sequence_inv_freq(config: ModelConfig, lengths: torch.Tensor, short: torch.Tensor,
                           long: Optional[torch.Tensor]) -> torch.Tensor:
    """dynamic / longrope: [..., d/2] for int64 lengths [...]: ``short`` up to the threshold, past it
    longrope's ``long`` or dynamic NTK's frequencies for that length."""
    past = lengths[..., None] > rope_threshold(config)
    other = _dynamic_ntk_inv_freq(config, lengths) if config.rope_type == "dynamic" else long
    return torch.where(past, other, short)


def rope_threshold(config: ModelConfig) -> Optional[int]:
    """The sequence length past which dynamic / longrope switch frequencies (None for other types)."""
    if config.rope_type == "dynamic":
        return config.max_position_embeddings
    if config.rope_type == "longrope":
        return config.rope_scaling["original_max_position_embeddings"]
    return None


def compute_inv_freq(config: ModelConfig, seq_len: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
    """RoPE inverse frequencies [rotary_dim // 2] in float32 on CPU, for a sequence of ``seq_len`` tokens
    (largest position + 1; only dynamic and longrope depend on it; None: within the original context).
    A tensor of lengths [...] gives [..., rotary_dim // 2] on its device."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    rs = config.rope_scaling
    rope_type = config.rope_type
    if rope_type in _PER_SEQUENCE_ROPE and seq_len is not None:
        on = seq_len.device if isinstance(seq_len, torch.Tensor) else "cpu"
        lengths = torch.as_tensor(seq_len, dtype=torch.int64, device=on)
        short = compute_inv_freq(config).to(lengths.device)
        long = _longrope_inv_freq(config, long=True).to(lengths.device) if rope_type == "longrope" else None
        return _per_sequence_inv_freq(config, lengths, short, long)
    if rs is None or rope_type == "dynamic":  # dynamic within max_position_embeddings: plain RoPE
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rs["factor"])
    if rope_type == "yarn":
        return _yarn_inv_freq(config)
    if rope_type == "longrope":
        return _longrope_inv_freq(config, long=False)
    if rope_type == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_freq_wavelen = old_ctx / low
        high_freq_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed down by `factor` ...
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        # ... short ones are kept, and the band in between is interpolated smoothly.
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {rope_type!r}")  # config validation makes this unreachable


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor transformers multiplies cos and sin by (yarn, longrope; 1 for the other types)."""
    rs = config.rope_scaling
    if config.rope_type not in ("yarn", "longrope"):
        return 1.0
    original_ctx = rs["original_max_position_embeddings"]
    factor = rs.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_ctx
    if rs.get("attention_factor") is not None:
        return rs["attention_factor"]
    if config.rope_type == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_ctx))

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if m and m_all:  # DeepSeek's spelling: the ratio of two mscales
        return float(mscale(factor, m) / mscale(factor, m_all))
    return mscale(factor)


def _sequence_lengths(position_ids: torch.Tensor, seq_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-token length (largest position + 1) of the sequence each token belongs to: [B, 1] per row,
    or [B, T] per packed sequence when ``seq_ids`` [B, T] (indices over the flattened batch) is given.
    Stays on the device (no host sync)."""
    if seq_ids is None:
        return position_ids.amax(dim=-1, keepdim=True) + 1
    flat_ids, flat_pos = seq_ids.reshape(-1), position_ids.reshape(-1).to(torch.int64)
    largest = flat_pos.new_zeros(flat_ids.numel() + 1).scatter_reduce(0, flat_ids, flat_pos, "amax")
    return largest[seq_ids] + 1


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q,k: [B, H, T, D]; cos, sin: [B, T, D] (HF rotate_half convention)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin per token from position_ids. Holds no buffer: inv_freq is a float32
    tensor cached per device outside the state dict, so `.to(bfloat16)` never rounds it
    and meta-device construction needs no special handling. yarn/longrope's attention
    factor multiplies cos and sin, as in transformers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.per_sequence = config.rope_type in _PER_SEQUENCE_ROPE  # frequencies depend on the sequence length
        self.attention_scaling = rope_attention_factor(config)
        self._inv_freq_cpu = compute_inv_freq(config)
        # longrope past its original context (dynamic computes its frequencies from the length instead)
        self._long_inv_freq_cpu = _longrope_inv_freq(config, long=True) if config.rope_type == "longrope" else None
        self._cache: dict[tuple[torch.device, bool], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, long: bool = False) -> torch.Tensor:
        t = self._cache.get((device, long))
        if t is None:
            t = (self._long_inv_freq_cpu if long else self._inv_freq_cpu).to(device)
            self._cache[(device, long)] = t
        return t

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype, seq_ids: Optional[torch.Tensor] = None):
        """position_ids [B, T]; seq_ids [B, T] (packed rows: each token's sequence index) lets dynamic and
        longrope choose their frequencies per packed sequence rather than per row."""
        if self.per_sequence:
            dev = position_ids.device
            long = self.inv_freq(dev, long=True) if self._long_inv_freq_cpu is not None else None
            lengths = _sequence_lengths(position_ids, seq_ids)  # [B, 1|T]
            inv = _per_sequence_inv_freq(self.config, lengths, self.inv_freq(dev), long)  # [B, 1|T, D/2]
        else:
            inv = self.inv_freq(position_ids.device)
        freqs = position_ids[..., None].float() * inv  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


# --------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """Llama's RMSNorm (weight times the normalised input, after its cast back), or with ``unit_offset``
    Gemma's: the normalised input times (1 + weight), in float32, then cast back (weights start at 0)."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.variance_epsilon = eps

    kernel_choice = KernelChoice()  # fastsft.model.fused.configure_kernels sets it per model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_choice.use("rms_norm", x):
            from fastsft.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.variance_epsilon, unit_offset=self.unit_offset)
        if self.unit_offset:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * (1.0 + self.weight.float())).type_as(x)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}" + (", 1 + w" if self.unit_offset else "")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.sliding_window = config.layer_sliding_window(layer_idx)
        self.rope_kind = config.layer_rope(layer_idx)  # which of the backbone's cos/sin tables this layer takes
        self.attention_dropout = config.attention_dropout  # on the attention probabilities, training only
        # None: SDPA's own 1/sqrt(head_dim) (bit for bit what transformers passes); else Gemma's scale
        self.scale = config.attention_scale if config.query_pre_attn_scalar is not None else None
        self.softcap = config.attn_logit_softcapping
        h, hd = config.hidden_size, config.head_dim
        self.fused = config.fused_projections
        if self.fused:  # Phi-3: one projection, rows [q; k; v]
            self.qkv_proj = nn.Linear(h, (self.num_heads + 2 * self.num_kv_heads) * hd, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.num_heads * hd, bias=config.attention_bias)
            self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
            self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, unit_offset=config.norm_unit_offset)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, unit_offset=config.norm_unit_offset)
        else:
            self.q_norm = None
            self.k_norm = None

    kernel_choice = KernelChoice()

    def _project_qkv(self, x):
        """q, k, v projections: one fused LoRA node when all three are LoRA layers alike."""
        if self.fused:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        if _same_lora(q, k, v) and self.kernel_choice.use("lora", x):
            from fastsft.kernels.lora import lora_proj, lora_qkv

            ps = [lora_proj(m) for m in (q, k, v)]
            return lora_qkv(x, [p.weight for p in ps], [p.bias for p in ps], [p.lora_A for p in ps],
                            [p.lora_B for p in ps], q.scaling, q.lora_dropout_p, q.training)
        return q(x), k(x), v(x)

    def _rotate(self, q, k, cos, sin):
        """RoPE on q [B, T, H, hd] and k [B, T, Hkv, hd] with per-token cos/sin [B, T, rotary_dim]; with a
        partial rotary factor the dims past rotary_dim pass through unrotated (as transformers' Phi-3)."""
        if self.rotary_dim != self.head_dim:
            kernel_usage.record("rope", "reference", "partial rotary embedding (Phi-4-mini): no Triton kernel")
            r = self.rotary_dim
            c, s = cos.unsqueeze(2), sin.unsqueeze(2)
            qr, kr = q[..., :r], k[..., :r]
            return (torch.cat([qr * c + rotate_half(qr) * s, q[..., r:]], dim=-1),
                    torch.cat([kr * c + rotate_half(kr) * s, k[..., r:]], dim=-1))
        if self.kernel_choice.use("rope", q):
            from fastsft.kernels.rope import apply_rope

            return apply_rope(q, k, cos, sin)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

    def forward(self, x, cos, sin, attn_mask: Union[None, torch.Tensor, "VarlenArgs"],
                kv_cache: Optional["KVCache"] = None):
        """attn_mask: None -> plain causal (SDPA is_causal fast path); a bool [B|1, 1, T, T]
        tensor -> SDPA with that mask; a `VarlenArgs` -> packed varlen kernel (CUDA only).
        kv_cache (generation): this layer's earlier keys/values are prepended; attn_mask is then
        [B, 1, T, past + T]. Soft-capped attention (Gemma 2) always takes the eager path."""
        B, T, _ = x.shape
        q, k, v = self._project_qkv(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self._rotate(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # [B, past + T, Hkv, hd]
        dropout_p = self.attention_dropout if self.training else 0.0  # as transformers: every path, training only
        if isinstance(attn_mask, VarlenArgs):
            # Packed rows on the varlen kernel: [B*T, H, D] token-major.
            out = attn_mask.attend(q.reshape(B * T, self.num_heads, self.head_dim),
                                   k.reshape(B * T, self.num_kv_heads, self.head_dim),
                                   v.reshape(B * T, self.num_kv_heads, self.head_dim),
                                   self.sliding_window, dropout_p, self.scale)
            return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.num_kv_heads != self.num_heads
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, attn_mask, self.scale, self.softcap, dropout_p)
        elif attn_mask is None:
            # Fast path: flash attention handles causal GQA natively.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, dropout_p=dropout_p,
                                                 scale=self.scale)
        else:
            if gqa:
                # The memory-efficient CUDA kernel (the one taking a mask) has no native
                # GQA, so expand kv heads rather than falling back to the math kernel.
                rep = self.num_heads // self.num_kv_heads
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out)


def softcapped_attention(q, k, v, mask: Optional[torch.Tensor], scale: Optional[float], softcap: float,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Attention with soft-capped scores (Gemma 2), s -> softcap * tanh(s / softcap) before the mask, in
    transformers' eager order: scores in q's dtype, softmax in float32 cast back. q [B, H, T, D], k/v
    [B, Hkv, S, D]; mask bool [B|1, 1, T, S] (True = attend) or None for causal (S == T). Neither SDPA's
    fused kernels nor the flash/varlen kernels can soft-cap, so this materialises the [B, H, T, S] scores."""
    kernel_usage.record("attention", "reference", "soft-capped attention scores (Gemma 2): eager matmul, tanh and "
                        "softmax; no SDPA/flash/varlen kernel soft-caps")
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (act = SiLU) or GeGLU (tanh-GELU, Gemma); Phi-3 computes gate and
    up with one gate_up_proj (rows [gate; up])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.act = config.hidden_act
        self.fused = config.fused_projections
        if self.fused:
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=False)
        else:
            self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
            self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    kernel_choice = KernelChoice()

    def forward(self, x):
        if self.fused:
            gate_up = self.gate_up_proj(x)
            return self.down_proj(self._gated(*gate_up.chunk(2, dim=-1)))
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if self.act == "silu" and _same_lora(gate, up, down) and self.kernel_choice.use("lora", x):
            # one node for the block; silu(g) * u recomputed in the backward, no dense W saved
            from fastsft.kernels.lora import lora_mlp, lora_proj

            return lora_mlp(x, lora_proj(gate), lora_proj(up), lora_proj(down), gate.scaling,
                            gate.lora_dropout_p, gate.training)
        return down(self._gated(gate(x), up(x)))

    def _gated(self, g, u):
        if self.act == "silu":
            if self.kernel_choice.use("swiglu", g):
                from fastsft.kernels.swiglu import swiglu

                return swiglu(g, u)
            return F.silu(g) * u
        if self.act == "gelu_pytorch_tanh":
            if self.kernel_choice.use("geglu", g):
                from fastsft.kernels.geglu import geglu

                return geglu(g, u)
            return F.gelu(g, approximate="tanh") * u
        kernel_usage.record("geglu", "reference", "exact-GELU gating (hidden_act 'gelu'): the kernel is tanh-GELU")
        return F.gelu(g) * u


def _same_lora(*modules) -> bool:
    """All LoRA layers with one scaling and dropout (what a fused block computes with)."""
    if not all(hasattr(m, "lora_A") and hasattr(m, "base_layer") and getattr(m, "adapter_enabled", True)
               for m in modules):
        return False
    first = modules[0]
    return all(m.scaling == first.scaling and m.lora_dropout_p == first.lora_dropout_p
               and m.training == first.training for m in modules)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        norm = dict(eps=config.rms_norm_eps, unit_offset=config.norm_unit_offset)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        # Llama: the norm before the MLP; Gemma 2/3 (sandwich norms): the norm of the attention output
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
        self.resid_dropout = config.resid_dropout  # Phi-3's resid_pdrop, training only

    def forward(self, h, cos, sin, attn_mask, kv_cache=None):
        a = self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, kv_cache)
        if self.sandwich:
            a = self.post_attention_layernorm(a)
            h = h + a
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        if self.resid_dropout:
            a = F.dropout(a, self.resid_dropout, self.training)
        h = h + a
        m = self.mlp(self.post_attention_layernorm(h))
        if self.resid_dropout:
            m = F.dropout(m, self.resid_dropout, self.training)
        return h + m


class KVCache:
    """Every layer's keys and values so far, for generation: `CausalLM.forward(new_ids,
    attention_mask=mask_of_all_tokens, kv_cache=cache)` attends the new tokens to everything before
    them and appends their keys/values. Greedy decoding then costs one token's forward per step, not
    the whole sequence's. Keys are stored rotated, as computed when their token was new (for dynamic
    and longrope scaling past the original context, as in transformers, earlier keys keep the
    frequencies of the length at which they were computed)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        """Tokens cached (per row, padding included)."""
        return 0 if not self.keys else next(iter(self.keys.values())).shape[1]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def _build_cached_mask(past: int, T: int, key_mask: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """[B, 1, T, past + T] (True = attend) for T new tokens after ``past`` cached ones: causal, not a pad
    key, within the window; every query sees itself."""
    device = key_mask.device
    q = torch.arange(past, past + T, device=device)
    k = torch.arange(past + T, device=device)
    diff = q[:, None] - k[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[None, None] & key_mask[:, None, None, :].bool()
    return allowed | (diff == 0)[None, None]


def _build_mask(T: int, key_mask: Optional[torch.Tensor], window: Optional[int], device) -> Optional[torch.Tensor]:
    """Boolean SDPA mask (True = attend) [B|1, 1, T, T]: causal AND key-not-pad AND in window.
    Every query may always see itself, so fully padded rows never produce NaN."""
    if key_mask is None and window is None:
        return None
    idx = torch.arange(T, device=device)
    diff = idx[:, None] - idx[None, :]  # q - k
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    eye = torch.eye(T, dtype=torch.bool, device=device)[None, None]
    return allowed | eye


# --------------------------------------------------------------------------- packed rows
# Packed batch: several sequences concatenated per row; `cu_seqlens` int32 [S+1] are cumulative
# lengths over the *flattened* B*T tokens, `position_ids` restart at 0 at each sequence start.
# Tokens after cu_seqlens[-1] are padding (they attend among themselves, never to real tokens).
# With B > 1 every sequence must lie within one row.
#
# CUDA (fp16/bf16, or float32 weights under half-precision autocast): a varlen flash kernel --
# flash-attn's `flash_attn_varlen_func` if installed, else torch's `torch.nn.attention.varlen.varlen_attn`.
# Everywhere else (CPU, float32, no kernel): SDPA with a block-diagonal causal (and windowed) boolean
# mask [B, 1, T, T]. On CUDA that is a fallback (fastsft.kernel_usage: loud, with its cost).
#
# varlen_attn's signature moves between torch releases: 2.11 takes `window_size` and no `enable_gqa`
# (its flash backend takes fewer K/V heads as they are), later releases need `enable_gqa=True` for GQA,
# and 2.10 had `is_causal` and no window. The call is built from the signature, and one self-check per
# process and dtype (forward and gradients against the mask path) decides how GQA is passed: natively,
# with the flag, or with K/V heads repeated.

# "auto": varlen kernel where it can run, else the mask; "mask": always the SDPA mask path.
PACKED_ATTN_BACKEND = "auto"


@lru_cache(maxsize=None)
def _varlen_kernel() -> Optional[tuple[str, Callable]]:
    """(name, fn) of the first importable varlen kernel, or None. Imported lazily, once."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return "flash_attn", flash_attn_varlen_func
    except Exception:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # type: ignore

        return "torch", varlen_attn
    except Exception:
        return None


def _varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """The flash varlen kernels are CUDA-only and half-precision-only."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _gqa_modes(name: str, fn: Callable) -> tuple[str, ...]:
    """How grouped K/V heads may be passed to this kernel, in order of preference: "native" (as they
    are), "flag" (`enable_gqa=True`), "repeat" (K/V heads repeated to the query heads first: the same
    attention FLOPs, more K/V memory traffic)."""
    if name == "flash_attn":
        return ("native",)
    params = inspect.signature(fn).parameters
    if "window_size" not in params:
        raise TypeError(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', 'varlen_attn')} takes no "
                        f"window_size (parameters: {', '.join(params)}); fastsft needs torch >= 2.11's varlen_attn")
    return ("flag",) if "enable_gqa" in params else ("native", "repeat")


class VarlenKernel(NamedTuple):
    name: str  # "flash_attn" or "torch"
    fn: Callable
    gqa: str  # see _gqa_modes

    def describe(self) -> str:
        return f"{self.name} varlen attention (GQA {self.gqa})"


class VarlenArgs(NamedTuple):
    """What every layer needs to run the varlen kernel (trailing padding already folded into
    cu_seqlens as a final sequence, so the kernel writes every output row)."""

    cu_seqlens: torch.Tensor  # int32 [S'+1], last entry == B*T
    max_seqlen: int
    kernel: VarlenKernel
    dtype: torch.dtype  # q/k/v go in in this dtype (after RoPE they may be float32 under autocast)

    def attend(self, q, k, v, window: Optional[int], dropout_p: float = 0.0,
               scale: Optional[float] = None) -> torch.Tensor:
        """q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]; causal within each sequence, and within
        the last `window` tokens (self included) where the layer has a sliding window; dropout_p on
        the attention probabilities (flash-attn only: _varlen_args sends dropout elsewhere to the mask);
        scale: what q k^T is multiplied by (None: 1/sqrt(head_dim))."""
        ws = (-1, 0) if window is None else (window - 1, 0)  # a tuple: torch reads (-1, 0) as is_causal
        cu, m, kernel = self.cu_seqlens, self.max_seqlen, self.kernel
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        if kernel.name == "flash_attn":  # GQA native
            return kernel.fn(q, k, v, cu, cu, m, m, dropout_p=dropout_p, softmax_scale=scale, causal=True,
                             window_size=ws)
        if dropout_p:
            raise RuntimeError("torch's varlen_attn takes no dropout_p; attention dropout must use the mask path")
        grouped = k.shape[1] != q.shape[1]
        if grouped and kernel.gqa == "repeat":
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        extra = {"enable_gqa": grouped} if kernel.gqa == "flag" else {}
        if scale is not None:  # Gemma's query_pre_attn_scalar (else the kernel's own 1/sqrt(head_dim))
            extra["scale"] = scale
        return kernel.fn(q, k, v, cu, cu, m, m, window_size=ws, **extra)


def _check_varlen(kernel: VarlenKernel, device: torch.device, dtype: torch.dtype) -> None:
    """Raises unless ``kernel`` matches the mask path (run in float32) in its output and in the
    gradients of q, k and v, on two packed sequences with GQA, with and without a window."""
    g = torch.Generator().manual_seed(0)
    lens, heads, kv_heads, head_dim = (5, 3), 4, 2, 64
    n = sum(lens)
    inputs = [torch.randn(n, h, head_dim, generator=g) for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(n, heads, head_dim, generator=g)
    cu = torch.tensor([0, lens[0], n], dtype=torch.int32, device=device)
    args = VarlenArgs(cu, max(lens), kernel, dtype)
    seq = _packed_seq_ids(cu, 1, n)
    rep = heads // kv_heads
    for window in (None, 2):
        q, k, v = (t.to(device, dtype).clone().requires_grad_() for t in inputs)  # own leaves per run
        got = args.attend(q, k, v, window)
        got.backward(grad_out.to(device, got.dtype))
        qf, kf, vf = (t.to(device).clone().requires_grad_() for t in inputs)
        mask = _build_packed_mask(seq, None, window)
        want = F.scaled_dot_product_attention(qf.transpose(0, 1)[None], kf.repeat_interleave(rep, 1).transpose(0, 1)[None],
                                              vf.repeat_interleave(rep, 1).transpose(0, 1)[None], attn_mask=mask)
        want = want[0].transpose(0, 1)
        want.backward(grad_out.to(device))
        for name, a, b in (("output", got, want), ("dq", q.grad, qf.grad), ("dk", k.grad, kf.grad),
                           ("dv", v.grad, vf.grad)):
            if a is None or a.shape != b.shape or not torch.allclose(a.detach().float(), b.detach(), atol=3e-2, rtol=3e-2):
                err = "missing" if a is None else (f"shape {tuple(a.shape)}" if a.shape != b.shape
                                                   else f"max error {float((a.detach().float() - b).abs().max()):.3g}")
                raise AssertionError(f"{name} differs from the mask path: {err} (window={window})")


@lru_cache(maxsize=None)
def _varlen_kernel_checked(device: torch.device, dtype: torch.dtype) -> tuple[Optional[VarlenKernel], str]:
    """(the varlen kernel with the GQA handling that matched the mask path on this device and dtype,
    or None; and what went wrong for each way tried). One check per process, device and dtype: a
    signature or convention this code does not know would otherwise train on wrong attention."""
    from fastsft.kernels import self_check_error

    found = _varlen_kernel()
    if found is None:
        return None, "no varlen attention kernel is importable (flash-attn, or torch.nn.attention.varlen)"
    name, fn = found
    try:
        modes = _gqa_modes(name, fn)
    except (TypeError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"
    errors = []
    for mode in modes:
        kernel = VarlenKernel(name, fn, mode)
        error = self_check_error("attention", device, dtype, lambda: _check_varlen(kernel, device, dtype))
        if error is None:
            return kernel, ""
        errors.append(f"{kernel.describe()} failed its self-check: {error}")
    return None, "; ".join(errors)


def _attention_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype q/k/v reach attention in: autocast's where it is on (float32 weights), else h's."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def _varlen_args(cu_seqlens: torch.Tensor, max_seqlen: Optional[int], n_tokens: int,
                 dtype: torch.dtype, dropout: bool = False) -> Optional[VarlenArgs]:
    """VarlenArgs when a varlen kernel can run these tensors (with attention dropout when ``dropout``),
    else None (-> mask path). The choice, and on CUDA why not, goes to fastsft.kernel_usage."""
    device = cu_seqlens.device
    if PACKED_ATTN_BACKEND == "mask":
        kernel_usage.record("attention", "reference", "masked SDPA forced (PACKED_ATTN_BACKEND = 'mask')")
        return None
    if not _varlen_supported(device, dtype):
        if device.type != "cuda":
            kernel_usage.record("attention", "reference", "CPU tensors: packed rows use masked SDPA")
            return None
        kernel_usage.fallback("attention", f"{str(dtype).replace('torch.', '')} attention inputs: the flash varlen "
                              "kernels take fp16/bf16 only (train.precision bf16)", where=str(device))
        return None
    kernel, why = _varlen_kernel_checked(device, dtype)
    if kernel is None:
        kernel_usage.fallback("attention", why, where=f"{device} ({str(dtype).replace('torch.', '')})")
        return None
    if dropout and kernel.name != "flash_attn":
        kernel_usage.fallback("attention", "attention_dropout > 0 in training: torch's varlen_attn has no dropout_p "
                              "(flash-attn's varlen kernel has; or set attention_dropout to 0)", where=str(device))
        return None
    kernel_usage.record("attention", "native", impl=kernel.describe())
    cu = cu_seqlens.to(torch.int32)
    last = int(cu[-1])  # one host sync per forward (not per layer)
    if last > n_tokens:
        raise ValueError(f"cu_seqlens[-1] = {last} exceeds the {n_tokens} tokens of the batch")
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if last < n_tokens:  # trailing padding becomes one more sequence so no output is left unwritten
        cu = torch.cat([cu, cu.new_tensor([n_tokens])])
        max_seqlen = max(int(max_seqlen), n_tokens - last)
    return VarlenArgs(cu, int(max_seqlen), kernel, dtype)


def _packed_seq_ids(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Per-token sequence index [B, T] (int64); tokens past cu_seqlens[-1] get index S (padding)."""
    cu = cu_seqlens.to(torch.int64)
    flat = torch.arange(B * T, device=cu.device)
    return (torch.searchsorted(cu, flat, right=True) - 1).view(B, T)


def _packed_position_ids(cu_seqlens: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every sequence start (and at the start of trailing padding)."""
    B, T = seq_ids.shape
    cu = cu_seqlens.to(torch.int64)
    flat = torch.arange(B * T, device=cu.device).view(B, T)
    return flat - cu[seq_ids]


def _build_packed_mask(seq_ids: torch.Tensor, key_mask: Optional[torch.Tensor], window: Optional[int]) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, T, T]: same sequence AND causal AND in window (AND key-not-pad).
    Sequences are contiguous, so row distance is distance within the sequence. The diagonal is
    always allowed, so no query row is empty (no NaN)."""
    B, T = seq_ids.shape
    idx = torch.arange(T, device=seq_ids.device)
    diff = idx[:, None] - idx[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[None] & (seq_ids[:, :, None] == seq_ids[:, None, :])
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :].bool()
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=seq_ids.device)[None]
    return allowed[:, None]


# --------------------------------------------------------------------------- model
class Backbone(nn.Module):
    """The `model.` part of the state dict (HF's LlamaModel equivalent)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.norm_unit_offset)
        self.rotary_emb = RotaryEmbedding(config)
        # Gemma 3's sliding layers: plain RoPE with their own base (layer.self_attn.rope_kind == "local")
        self.rotary_emb_local = RotaryEmbedding(config.local_rope_config()) if config.rope_local_theta else None
        self.embed_scale = config.embed_scale
        self.neftune_alpha = 0.0  # NEFTune noise on the embeddings in training (see add_neftune_noise)
        self.gradient_checkpointing = False
        self.offload_activations = False  # with checkpointing: saved layer inputs in pinned CPU memory

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.embed_scale is not None:  # Gemma: sqrt(hidden) rounded to the weights' dtype, as transformers
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype, device=h.device)
        return h

    def add_neftune_noise(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """NEFTune (Jain et al., 2023): in training, h + U(-1, 1) * alpha / sqrt(L * d), with L the length of
        the sequence each token belongs to (``lengths`` [B, 1] per row or [B, T] per token: a packed row's
        sequences each get their own), d the hidden size."""
        if not (self.training and self.neftune_alpha):
            return h
        scale = self.neftune_alpha / torch.sqrt(lengths.clamp_min(1).to(torch.float32) * h.shape[-1])
        noise = torch.empty(h.shape, dtype=torch.float32, device=h.device).uniform_(-1.0, 1.0)
        return h + (noise * scale[..., None]).to(h.dtype)

    def rope_tables(self, position_ids, dtype, seq_ids=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per RoPE kind the layers use ("global", and Gemma 3's "local")."""
        tables = {"global": self.rotary_emb(position_ids, dtype, seq_ids=seq_ids)}
        if self.rotary_emb_local is not None:
            tables["local"] = self.rotary_emb_local(position_ids, dtype, seq_ids=seq_ids)
        return tables

    def forward(self, input_ids, position_ids=None, attention_mask=None, cu_seqlens=None, max_seqlen=None,
                kv_cache: Optional[KVCache] = None, seq_lengths: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None):
        """seq_lengths [B]: each (right-padded) row's real length, read by NEFTune only. inputs_embeds
        [B, T, D]: used instead of ``embed(input_ids)`` (multimodal: image features spliced in); input_ids
        still give the shape."""
        if kv_cache is not None:
            return self._forward_cached(input_ids, position_ids, attention_mask, kv_cache, inputs_embeds)
        if input_ids.dim() == 1:  # a single packed row given as [T] -> hidden [T, D]
            if position_ids is not None and position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
            if inputs_embeds is not None and inputs_embeds.dim() == 2:
                inputs_embeds = inputs_embeds.unsqueeze(0)
            return self.forward(input_ids.unsqueeze(0), position_ids, attention_mask, cu_seqlens, max_seqlen,
                                seq_lengths=seq_lengths, inputs_embeds=inputs_embeds)[0]
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be [B, T] = {(B, T)}, got {tuple(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: keep the is_causal fast path
        if cu_seqlens is not None:
            return self._forward_packed(input_ids, position_ids, attention_mask, cu_seqlens, max_seqlen, inputs_embeds)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            else:
                position_ids = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, T)

        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.neftune_alpha and self.training:
            if seq_lengths is not None:
                lengths = seq_lengths.to(device).view(B, 1)
            elif attention_mask is not None:
                lengths = attention_mask.sum(-1, keepdim=True)
            else:
                lengths = torch.full((B, 1), T, device=device)
            h = self.add_neftune_noise(h, lengths)
        ropes = self.rope_tables(position_ids, h.dtype)
        masks: dict[Optional[int], Optional[torch.Tensor]] = {}
        for layer in self.layers:
            w = layer.self_attn.sliding_window
            if w not in masks:
                masks[w] = _build_mask(T, attention_mask, w, device)
            h = self._run_layer(layer, h, *ropes[layer.self_attn.rope_kind], masks[w])
        return self.norm(h)

    def _forward_cached(self, input_ids, position_ids, attention_mask, kv_cache: KVCache, inputs_embeds=None):
        """Generation: ``input_ids`` [B, T] are new tokens after ``len(kv_cache)`` cached ones;
        ``attention_mask`` [B, past + T] covers all of them (1 = token, 0 = left padding)."""
        B, T = input_ids.shape
        past = len(kv_cache)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"with a kv_cache of {past} tokens, attention_mask must be [B, past + T] = "
                             f"{(B, past + T)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        ropes = self.rope_tables(position_ids, h.dtype)
        masks: dict[Optional[int], torch.Tensor] = {}
        for layer in self.layers:
            w = layer.self_attn.sliding_window
            if w not in masks:
                masks[w] = _build_cached_mask(past, T, attention_mask, w)
            h = layer(h, *ropes[layer.self_attn.rope_kind], masks[w], kv_cache)
        return self.norm(h)

    def _run_layer(self, layer, h, cos, sin, mask):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_layer(layer, h, cos, sin, mask, offload=self.offload_activations)
        return layer(h, cos, sin, mask)

    def _forward_packed(self, input_ids, position_ids, attention_mask, cu_seqlens, max_seqlen, inputs_embeds=None):
        """Packed rows: attention stays inside each sequence of cu_seqlens (see module notes)."""
        B, T = input_ids.shape
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [S+1], got shape {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.to(input_ids.device)
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            kernel_usage.record("attention", "reference", "an attention_mask given with packed rows: masked SDPA")
            varlen = None
        elif self.config.attn_logit_softcapping is not None:
            varlen = None  # soft-capped scores: the eager path over the block-diagonal mask (softcapped_attention)
        else:
            varlen = _varlen_args(cu_seqlens, max_seqlen, B * T, _attention_dtype(h),
                                  dropout=self.training and self.config.attention_dropout > 0)
        seq_ids = None
        neftune = bool(self.neftune_alpha and self.training)
        if varlen is None or position_ids is None or self.rotary_emb.per_sequence or neftune:
            seq_ids = _packed_seq_ids(cu_seqlens, B, T)
        if neftune:  # each packed sequence its own length (trailing padding: the rest of the row)
            bounds = torch.cat([cu_seqlens.to(torch.int64), cu_seqlens.new_tensor([B * T]).to(torch.int64)])
            h = self.add_neftune_noise(h, torch.diff(bounds)[seq_ids])
        if position_ids is None:
            position_ids = _packed_position_ids(cu_seqlens, seq_ids)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, T)
        # dynamic / longrope pick each packed sequence's frequencies from its own length (see RoPE notes)
        ropes = self.rope_tables(position_ids, h.dtype, seq_ids=seq_ids)
        masks: dict[Optional[int], torch.Tensor] = {}
        for layer in self.layers:
            if varlen is not None:
                mask = varlen
            else:
                w = layer.self_attn.sliding_window
                if w not in masks:
                    masks[w] = _build_packed_mask(seq_ids, attention_mask, w)
                mask = masks[w]
            h = self._run_layer(layer, h, *ropes[layer.self_attn.rope_kind], mask)
        return self.norm(h)


class CausalLM(nn.Module):
    """Decoder-only LM. forward(...) -> final-normed hidden states [B, T, D]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    # -- weight tying -------------------------------------------------------
    def tie_weights(self) -> None:
        """Make lm_head.weight the very same Parameter as embed_tokens.weight (if tied)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = bool(value)

    @property
    def offload_activations(self) -> bool:
        """With gradient checkpointing: keep each layer's saved input in (pinned) CPU memory."""
        return self.model.offload_activations

    @offload_activations.setter
    def offload_activations(self, value: bool) -> None:
        self.model.offload_activations = bool(value)

    # -- forward ------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        kv_cache: Optional[KVCache] = None,
        seq_lengths: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids [B,T]; position_ids [B,T] (default arange, or cumsum(mask)-1 with a mask);
        attention_mask [B,T] 1=token 0=pad (e.g. left padding). Returns hidden [B,T,D].

        Packed rows: cu_seqlens int32 [S+1] over the flattened B*T tokens (each sequence within
        one row; tokens past cu_seqlens[-1] are padding), max_seqlen its longest sequence
        (optional), position_ids restarting at 0 per sequence (derived from cu_seqlens if
        omitted). Tokens attend causally within their own sequence only. A 1-D input_ids [T]
        is one row and returns hidden [T, D].

        kv_cache (generation, `KVCache`): input_ids are the tokens after the cached ones and
        attention_mask covers all of them.

        inputs_embeds [B,T,D] (or [T,D]): the decoder's input embeddings, used instead of embedding
        input_ids (which still give the shape); the multimodal wrapper splices image features into them."""
        if kv_cache is not None:
            return self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache,
                              inputs_embeds=inputs_embeds)
        return self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, seq_lengths=seq_lengths,
                          inputs_embeds=inputs_embeds)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states, soft-capped where the config says (Gemma 2/3's final_logit_softcapping;
        the training loss applies the same cap inside the fused loss)."""
        z = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z

    # -- utilities ----------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """HF-style init: normal(0, initializer_range) for Linear/Embedding weights,
        zeros for biases, ones for RMSNorm weights."""
        std = self.config.initializer_range
        dev = next(self.parameters()).device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        seen: set[int] = set()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                if id(m.weight) not in seen:
                    seen.add(id(m.weight))
                    m.weight.normal_(0.0, std, generator=gen)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(0.0 if m.unit_offset else 1.0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def build_model(
    config: Union[ModelConfig, str],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
) -> CausalLM:
    """A randomly initialised CausalLM (config may be a preset name, e.g. "tiny")."""
    if isinstance(config, str):
        config = ModelConfig.from_name(config)
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype)  # free on meta: memory is allocated once, directly in `dtype`
    model.to_empty(device=device)
    model.tie_weights()  # to_empty may re-create Parameters, so tie again
    model.init_weights(seed)
    return model
