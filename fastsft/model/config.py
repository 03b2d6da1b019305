"""Model configuration for fastsft's Llama-family decoder.

`ModelConfig` is a plain dataclass that covers the subset of the Hugging Face
config schema fastsft implements (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3 text, Phi-3/Phi-4-mini). It reads
config.json files written by both transformers 4.x (top-level `rope_theta` plus
`rope_scaling` with "type"/"rope_type") and transformers 5.x (`rope_parameters`,
which also carries `rope_theta`), and writes a config.json that transformers'
AutoConfig / AutoModelForCausalLM load back to the same architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# Gemma's decoders: RMSNorm scaling by (1 + w) in float32, embeddings scaled by sqrt(hidden_size).
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
# Families whose layers carry extra pre/post feed-forward norms and a norm on the attention output.
SANDWICH_NORM_TYPES = ("gemma2", "gemma3_text")
# MLP activations fastsft implements (transformers' ACT2FN names; "swish" is SiLU there too).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
ACTIVATION_ALIASES = {"swish": "silu"}
LAYER_TYPES = ("full_attention", "sliding_attention")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
# Older spellings of a rope type, read as the type they name (and written back under that name).
ROPE_TYPE_ALIASES = {"su": "longrope"}  # Phi-3's first 128k checkpoints

# model_type -> the HF class name written to config.json "architectures".
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

# Parameters each rope type reads besides rope_theta (kept in ModelConfig.rope_theta): (required,
# optional). An optional one that is absent takes transformers' default (see llama.compute_inv_freq).
# Any other key in rope_scaling/rope_parameters is one transformers 5 ignores too (it only warns), so
# it is dropped; ROPE_KEYS_REFUSED are the exception.
ROPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
    # dynamic NTK keys on max_position_embeddings (not original_max_position_embeddings), as transformers does
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor"), ("original_max_position_embeddings", "factor", "attention_factor")),
}
# rope keys that change the math but that fastsft does not implement: refused unless one of these values.
ROPE_KEYS_REFUSED: dict[str, tuple] = {"partial_rotary_factor": (None, 1, 1.0)}
# rope keys transformers' Llama-family models never read for the math (checked by tests/model/test_config_fields.py
# against transformers' RopeParameters): the type's name and base, and multimodal RoPE's sections.
ROPE_KEYS_INERT = ("rope_type", "type", "rope_theta", "mrope_section")
# Rope types whose original_max_position_embeddings defaults to max_position_embeddings, and for which a
# top-level original_max_position_embeddings (Phi-3's spelling) takes precedence, as in transformers 5.
_ROPE_TYPES_WITH_ORIGINAL_CTX = ("llama3", "yarn", "longrope")

# ---------------------------------------------------------------------------------------------- HF fields
# How from_hf_dict treats every field of the transformers config classes it loads (LlamaConfig,
# MistralConfig, Qwen2Config, Qwen3Config), and the undeclared config.json keys their code reads:
#   READ   parsed into ModelConfig (for the families whose transformers class reads it);
#   INERT  does not change the forward or backward math (token ids, output flags, bookkeeping);
#   a tuple: refused with one ValueError line unless the value is one of those listed.
# A config.json key not listed here is one transformers does not declare for the family (ignored, as
# transformers ignores it), or -- with a value off transformers' default -- a field a newer transformers
# declares: refused by name (see _check_hf_fields). tests/model/test_config_fields.py walks the
# transformers classes and fails on a declared field missing here.
READ, INERT = "read", "inert"
HF_FIELDS: dict[str, Union[str, tuple]] = {
    # architecture
    "model_type": READ,
    "vocab_size": READ,
    "hidden_size": READ,
    "intermediate_size": READ,
    "num_hidden_layers": READ,
    "num_attention_heads": READ,
    "num_key_value_heads": READ,
    "head_dim": READ,  # declared by Llama/Mistral/Qwen3; Qwen2's modeling code reads it when present
    "rms_norm_eps": READ,
    "tie_word_embeddings": READ,
    "attention_bias": READ,  # llama/qwen3 (mistral and qwen2 hard-code their biases, as fastsft does)
    "mlp_bias": READ,  # llama only
    "attention_dropout": READ,
    "initializer_range": READ,  # init of new weights only
    # RoPE (rope_scaling: transformers 4 layout; rope_theta/partial_rotary_factor: top-level 4.x keys)
    "rope_parameters": READ,
    "rope_scaling": READ,
    "rope_theta": READ,
    "max_position_embeddings": READ,  # dynamic NTK's threshold, the default original context of yarn/longrope
    "original_max_position_embeddings": READ,  # top-level (Phi-3): wins over the rope dict's, as in transformers 5
    "partial_rotary_factor": READ,  # phi3 (Phi-4-mini rotates 3/4 of each head); refused elsewhere unless 1
    # attention windows
    "sliding_window": READ,
    "use_sliding_window": READ,  # qwen2/qwen3
    "max_window_layers": READ,  # qwen2/qwen3
    "layer_types": READ,  # qwen2/qwen3/gemma2/gemma3_text (Mistral's and Phi-3's modeling code ignore it)
    "sliding_window_pattern": READ,  # gemma3_text's older spelling of layer_types (every n-th layer global)
    "_sliding_window_pattern": INERT,  # Gemma3TextConfig's private copy of it (layer_types decides)
    "hidden_act": READ,  # one of SUPPORTED_ACTIVATIONS (or "swish"); gemma2/gemma3_text read hidden_activation
    "hidden_activation": READ,
    # Gemma
    "query_pre_attn_scalar": READ,  # gemma2/gemma3_text: attention scale query_pre_attn_scalar ** -0.5
    "attn_logit_softcapping": READ,  # gemma2 (gemma3_text's attention never reads it: refused unless null)
    "final_logit_softcapping": READ,  # gemma2/gemma3_text: passed to the fused loss as softcap
    "rope_local_base_freq": READ,  # gemma3_text's sliding layers' RoPE base (transformers 4 layout)
    "use_bidirectional_attention": (None, False),  # EmbeddingGemma's encoder mode
    "cache_implementation": INERT,  # generation cache layout ("hybrid" in Gemma 2 configs)
    # Phi-3
    "resid_pdrop": READ,  # dropout on the attention and MLP outputs before each residual add, training only
    "embd_pdrop": INERT,  # declared by Phi3Config, read by no Phi-3 modeling code
    # no effect on the math
    "pretraining_tp": INERT,  # unread by transformers 5; 4.x only split the same matmuls into slices
    "bos_token_id": INERT,
    "eos_token_id": INERT,
    "pad_token_id": INERT,
    "dtype": INERT,  # recorded as ModelConfig.torch_dtype (the checkpoint's storage dtype)
    "torch_dtype": INERT,
    "use_cache": INERT,
    "output_attentions": INERT,
    "output_hidden_states": INERT,
    "return_dict": INERT,
    "architectures": INERT,
    "transformers_version": INERT,
    "_name_or_path": INERT,
    "chunk_size_feed_forward": INERT,  # unread by the Llama-family models
    "is_encoder_decoder": INERT,
    "id2label": INERT,  # classification heads only
    "label2id": INERT,
    "problem_type": INERT,
    "quantization_config": INERT,  # bitsandbytes 4-bit: fastsft.model.loading reads it
}

# What transformers' config class of each family gives a READ field that config.json omits, where that
# is not ModelConfig's own default (e.g. Qwen3's head_dim is 128, not hidden_size // num_attention_heads;
# Mistral's sliding_window is 4096). Checked against transformers by tests/model/test_config_fields.py.
_SIZES = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6,
              max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.02,
              attention_dropout=0.0, rope_theta=10000.0)
_GEMMA = dict(_SIZES, vocab_size=256000, head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True,
              attention_bias=False)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_SIZES, attention_bias=False, mlp_bias=False),
    "mistral": dict(_SIZES, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                    sliding_window=4096),
    "qwen2": dict(_SIZES, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28),
    "qwen3": dict(_SIZES, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, head_dim=128,
                  max_position_embeddings=32768, attention_bias=False, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
    "gemma": dict(_GEMMA, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=16, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(_GEMMA, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                   num_key_value_heads=4, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_GEMMA, vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, hidden_activation="gelu_pytorch_tanh",
                        max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window_pattern=6),
    "phi3": dict(_SIZES, vocab_size=32064, hidden_size=3072, intermediate_size=8192, max_position_embeddings=4096,
                 original_max_position_embeddings=4096, rms_norm_eps=1e-5, resid_pdrop=0.0, sliding_window=None,
                 partial_rotary_factor=1.0),
}

TokenId = Optional[Union[int, list]]


def _unsupported_model_type(model_type: Any) -> ValueError:
    return ValueError(
        f"unsupported model_type {model_type!r}; fastsft supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _unsupported_rope_type(rope_type: Any) -> ValueError:
    return ValueError(
        f"unsupported rope type {rope_type!r}; fastsft supports: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _refused(where: str, key: str, value: Any, accepted: tuple) -> ValueError:
    ok = ", ".join(repr(v) for v in accepted if v is not None)
    return ValueError(f"{where} field {key!r} = {value!r} is not supported by fastsft (it implements {ok} only)")


def _normalize_rope_scaling(rope: Optional[dict], head_dim: int, max_position_embeddings: int) -> Optional[dict]:
    """Return {"rope_type": t, **the params t reads} without rope_theta, or None for plain RoPE."""
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope).__name__}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _unsupported_rope_type(rope_type)
    for key, accepted in ROPE_KEYS_REFUSED.items():
        if rope.get(key) not in accepted:
            raise _refused("rope_scaling/rope_parameters", key, rope[key], accepted)
    required, optional = ROPE_KEYS[rope_type]
    missing = [k for k in required if k not in rope]
    if missing:
        raise ValueError(f"rope type {rope_type!r} requires {missing} in rope_scaling/rope_parameters")
    if rope_type == "default":
        return None
    out = {"rope_type": rope_type, **{k: rope[k] for k in required + optional if k in rope}}
    factor = out.get("factor")
    if (factor is not None or rope_type in ("linear", "dynamic", "llama3")) and (
            isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
        raise ValueError(f"rope type {rope_type!r} needs a positive number as factor, got {factor!r}")
    if rope_type in _ROPE_TYPES_WITH_ORIGINAL_CTX and out.get("original_max_position_embeddings") is None:
        out["original_max_position_embeddings"] = max_position_embeddings
    if rope_type == "longrope":
        for k in ("short_factor", "long_factor"):
            if not isinstance(out[k], (list, tuple)) or len(out[k]) != head_dim // 2:
                raise ValueError(f"longrope {k} must be a list of head_dim // 2 = {head_dim // 2} numbers")
            out[k] = [float(x) for x in out[k]]
    return out


def _hf_declared_default(model_type: str, key: str) -> Any:
    """The default of field ``key`` in the installed transformers' config class for ``model_type``, or
    _NOT_DECLARED when that class does not declare it (or transformers cannot be imported)."""
    try:
        from transformers import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
    except Exception:
        return _NOT_DECLARED
    if dataclasses.is_dataclass(cls):  # transformers 5
        for f in dataclasses.fields(cls):
            if f.name == key:
                if f.default is not dataclasses.MISSING:
                    return f.default
                return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        return _NOT_DECLARED
    param = inspect.signature(cls.__init__).parameters.get(key)  # transformers 4: __init__ keywords
    if param is None or param.kind is inspect.Parameter.VAR_KEYWORD:
        return _NOT_DECLARED
    return None if param.default is inspect.Parameter.empty else param.default


_NOT_DECLARED = object()


def _check_hf_fields(d: dict) -> None:
    """One ValueError line for the first config.json field that changes the math and that fastsft neither
    reads nor implements: a refused field off its accepted values, or a field HF_FIELDS does not know
    that the installed transformers declares for this family, set off its default."""
    mt = d.get("model_type")
    for key, value in d.items():
        rule = HF_FIELDS.get(key)
        if isinstance(rule, tuple):
            if value not in rule:
                raise _refused("config.json", key, value, rule)
        elif rule is None:
            default = _hf_declared_default(mt, key)
            if default is not _NOT_DECLARED and value != default:
                raise ValueError(f"config.json field {key!r} = {value!r} changes the model in transformers "
                                 f"(default {default!r}) and fastsft does not implement it")


@dataclass
class ModelConfig:
    # Architecture family; one of SUPPORTED_MODEL_TYPES. Decides the HF class on save
    # and which bias / norm options are legal.
    model_type: str = "llama"
    # Number of token embeddings (rows of embed_tokens and lm_head).
    vocab_size: int = 32000
    # Residual stream width.
    hidden_size: int = 4096
    # Width of the SiLU-gated MLP (gate_proj/up_proj output size).
    intermediate_size: int = 11008
    # Number of decoder layers.
    num_hidden_layers: int = 32
    # Number of query heads.
    num_attention_heads: int = 32
    # Number of key/value heads (GQA when < num_attention_heads); defaults to num_attention_heads.
    num_key_value_heads: Optional[int] = None
    # Per-head width; derived as hidden_size // num_attention_heads when absent.
    head_dim: Optional[int] = None
    # Epsilon of every RMSNorm.
    rms_norm_eps: float = 1e-6
    # RoPE base.
    rope_theta: float = 10000.0
    # RoPE scaling: None (plain RoPE) or {"rope_type": one of SUPPORTED_ROPE_TYPES, ...the params
    # ROPE_KEYS lists for it}; original_max_position_embeddings defaults to max_position_embeddings.
    rope_scaling: Optional[dict] = None
    # Context length the model was trained for. Only RoPE reads it: dynamic NTK rescales past it, and
    # yarn/longrope derive their factor from it when theirs is absent (RoPE is computed on the fly).
    max_position_embeddings: int = 2048
    # lm_head.weight is the same tensor as model.embed_tokens.weight.
    tie_word_embeddings: bool = False
    # Bias on q_proj, k_proj, v_proj (Llama attention_bias, Qwen2 always, Qwen3 attention_bias).
    attention_bias: bool = False
    # Bias on o_proj (Llama/Qwen3 attention_bias put it on o_proj too; Qwen2 never does).
    # Defaults to attention_bias for llama/qwen3 and False for qwen2/mistral.
    o_proj_bias: Optional[bool] = None
    # Bias on gate/up/down projections (Llama only).
    mlp_bias: bool = False
    # RMSNorm over head_dim on q and k before RoPE (Qwen3); defaults to model_type == "qwen3".
    qk_norm: Optional[bool] = None
    # Sliding-window attention width (a key is visible iff q - window < k <= q), or None.
    sliding_window: Optional[int] = None
    # Qwen2/Qwen3 only: layers with index >= max_window_layers use the sliding window;
    # None means every layer does (Mistral).
    max_window_layers: Optional[int] = None
    # Dropout on the attention probabilities in training mode (every attention path; see llama.Attention).
    attention_dropout: float = 0.0
    # Per-layer attention kind, "full_attention" or "sliding_attention" (any pattern); when set it decides
    # which layers use sliding_window (instead of max_window_layers), and in gemma3_text which RoPE base.
    layer_types: Optional[list] = None
    # MLP activation of the gated MLP: act(gate) * up. One of SUPPORTED_ACTIVATIONS; default silu
    # (SwiGLU); Gemma's is gelu_pytorch_tanh (GeGLU, tanh-approximated GELU).
    hidden_act: Optional[str] = None
    # Gemma 2/3: attention scores scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
    query_pre_attn_scalar: Optional[float] = None
    # Gemma 2: attention scores soft-capped, s -> c tanh(s / c), before the mask and softmax.
    attn_logit_softcapping: Optional[float] = None
    # Gemma 2/3: logits soft-capped the same way (the fused loss's softcap; CausalLM.logits applies it).
    final_logit_softcapping: Optional[float] = None
    # Gemma 3: the RoPE base of the sliding-window layers (plain RoPE; rope_theta/rope_scaling are the
    # full-attention layers').
    rope_local_theta: Optional[float] = None
    # Phi-3: dropout on the attention and MLP outputs before each residual add, training only.
    resid_dropout: float = 0.0
    # Phi-3 (Phi-4-mini: 0.75): RoPE rotates the first int(head_dim * factor) dims of each head only.
    partial_rotary_factor: float = 1.0
    # Std of the normal init for Linear / Embedding weights.
    initializer_range: float = 0.02
    # Special token ids, as in config.json (eos may be a list, e.g. Llama 3.1).
    bos_token_id: TokenId = None
    eos_token_id: TokenId = None
    pad_token_id: TokenId = None
    # Unrecognised config.json keys are not kept; this records the checkpoint dtype string if known.
    torch_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise _unsupported_model_type(self.model_type)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is absent")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        mt = self.model_type
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.partial_rotary_factor != 1 and mt != "phi3":
            raise _refused(f"{mt} config", "partial_rotary_factor", self.partial_rotary_factor, (1.0,))
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(f"the rotary dims of a head (head_dim x partial_rotary_factor = {self.rotary_dim}) "
                             "must be even and positive for RoPE")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.rotary_dim, self.max_position_embeddings)
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if not 0.0 <= self.resid_dropout < 1.0:
            raise ValueError(f"resid_dropout must be in [0, 1), got {self.resid_dropout}")
        if self.resid_dropout and mt != "phi3":
            raise ValueError(f"resid_dropout is a phi3 option (resid_pdrop), not {mt!r}'s")

        if self.hidden_act is None:
            self.hidden_act = "gelu_pytorch_tanh" if mt in GEMMA_TYPES else "silu"
        self.hidden_act = ACTIVATION_ALIASES.get(self.hidden_act, self.hidden_act)
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; fastsft supports: "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.qk_norm is None:
            self.qk_norm = mt in ("qwen3", "gemma3_text")
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias if mt in ("llama", "qwen3", *GEMMA_TYPES) else False
        if mt in ("gemma2", "gemma3_text") and self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = 256  # transformers' default
        for key, owners in (("query_pre_attn_scalar", ("gemma2", "gemma3_text")),
                            ("attn_logit_softcapping", ("gemma2",)),
                            ("final_logit_softcapping", ("gemma2", "gemma3_text")),
                            ("rope_local_theta", ("gemma3_text",))):
            value = getattr(self, key)
            if value is not None and mt not in owners:
                raise ValueError(f"{key} is a {'/'.join(owners)} option, not {mt!r}'s")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{key} must be a positive number or null, got {value!r}")
        if mt == "gemma3_text" and self.rope_local_theta is None:
            self.rope_local_theta = 10_000.0
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"layer_types must list one of {LAYER_TYPES} per layer "
                                 f"({self.num_hidden_layers} layers), got {self.layer_types!r}")
            if mt in ("llama", "mistral", "gemma", "phi3"):
                raise ValueError(f"layer_types is not read by {mt!r} models in transformers")
        elif mt in ("gemma2", "gemma3_text"):
            every = 2 if mt == "gemma2" else 6  # transformers' defaults: every 2nd / 6th layer global
            self.layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                                for i in range(self.num_hidden_layers)]
        # Reject combinations that the HF class of this model_type cannot express,
        # so that save_pretrained always round-trips.
        if self.qk_norm != (mt in ("qwen3", "gemma3_text")):
            raise ValueError(f"qk_norm={self.qk_norm} is not expressible for model_type {mt!r} (qwen3 and "
                             "gemma3_text only)")
        if mt in ("llama", "qwen3", *GEMMA_TYPES) and self.o_proj_bias != self.attention_bias:
            raise ValueError(f"{mt}: attention_bias applies to q,k,v and o alike; o_proj_bias must equal it")
        if mt == "phi3" and (self.attention_bias or self.o_proj_bias):
            raise ValueError("phi3 has no attention biases")
        if mt == "qwen2" and (not self.attention_bias or self.o_proj_bias):
            raise ValueError("qwen2 always has q/k/v bias and no o_proj bias")
        if mt == "mistral" and (self.attention_bias or self.o_proj_bias):
            raise ValueError("mistral has no attention biases")
        if self.mlp_bias and mt != "llama":
            raise ValueError(f"mlp_bias is only supported for model_type 'llama', not {mt!r}")
        if self.max_window_layers is not None and mt not in ("qwen2", "qwen3"):
            raise ValueError("max_window_layers is a qwen2/qwen3 option")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

    # ------------------------------------------------------------------ helpers
    def layer_sliding_window(self, layer_idx: int) -> Optional[int]:
        """The sliding window that layer `layer_idx` uses, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None
        if self.max_window_layers is not None and layer_idx < self.max_window_layers:
            return None
        return self.sliding_window

    def layer_rope(self, layer_idx: int) -> str:
        """Which RoPE layer `layer_idx` uses: "local" (gemma3_text's sliding layers: plain RoPE with base
        rope_local_theta) or "global" (rope_theta and rope_scaling: every other layer)."""
        if self.rope_local_theta is not None and self.layer_types[layer_idx] == "sliding_attention":
            return "local"
        return "global"

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (all of them unless partial_rotary_factor < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def norm_unit_offset(self) -> bool:
        """RMSNorm scales by (1 + weight) in float32 (Gemma), not by weight after the cast back."""
        return self.model_type in GEMMA_TYPES

    @property
    def embed_scale(self) -> Optional[float]:
        """Embeddings are multiplied by sqrt(hidden_size) (Gemma; rounded to the weights' dtype first)."""
        return self.hidden_size ** 0.5 if self.model_type in GEMMA_TYPES else None

    @property
    def sandwich_norms(self) -> bool:
        """Norms after attention and around the MLP too (Gemma 2/3)."""
        return self.model_type in SANDWICH_NORM_TYPES

    @property
    def fused_projections(self) -> bool:
        """One qkv_proj and one gate_up_proj Linear per layer (Phi-3), not q/k/v_proj and gate/up_proj."""
        return self.model_type == "phi3"

    @property
    def attention_scale(self) -> float:
        """What q k^T is multiplied by before the softmax."""
        return float(self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5

    def local_rope_config(self) -> "ModelConfig":
        """gemma3_text's sliding layers' RoPE as a config of its own (plain RoPE, base rope_local_theta)."""
        return self.replace(rope_theta=float(self.rope_local_theta), rope_scaling=None)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    # --------------------------------------------------------------- factories
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        mt = d.get("model_type")
        if mt == "gemma3" and isinstance(d.get("text_config"), dict):
            raise ValueError("model_type 'gemma3' is Gemma 3's vision-language checkpoint; fastsft trains Gemma 3 "
                             "text models (model_type 'gemma3_text', e.g. gemma-3-1b, or the text part saved alone)")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise _unsupported_model_type(mt)
        act_key = "hidden_activation" if mt in SANDWICH_NORM_TYPES else "hidden_act"
        act = d.get(act_key, HF_DEFAULTS[mt].get(act_key, "silu"))
        if mt == "gemma" and act == "gelu":
            act = "gelu_pytorch_tanh"  # transformers' GemmaConfig: the official releases' "gelu" meant tanh-GELU
        if ACTIVATION_ALIASES.get(act, act) not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported {act_key} {act!r}; fastsft supports: {', '.join(SUPPORTED_ACTIVATIONS)}")
        _check_hf_fields(d)
        if mt == "gemma3_text" and d.get("attn_logit_softcapping") is not None:
            raise ValueError("config.json field 'attn_logit_softcapping' is set, but transformers' Gemma 3 attention "
                             "never applies it; fastsft refuses rather than guess (set it to null)")
        # A field config.json omits takes the default of transformers' class for this family.
        d = {**HF_DEFAULTS[mt], **d}

        # RoPE: transformers 5 writes rope_parameters (with rope_theta inside); older configs use a
        # top-level rope_theta and rope_scaling with "type" or "rope_type". Where both are present,
        # transformers 5 takes rope_scaling, and the chosen dict's own rope_theta over the top-level one.
        rope_params = d.get("rope_parameters")
        rope_scaling = d.get("rope_scaling")
        for name, r in (("rope_parameters", rope_params), ("rope_scaling", rope_scaling)):
            if r is not None and not isinstance(r, dict):
                raise ValueError(f"{name} must be a dict")
        local_theta = None
        if mt == "gemma3_text":
            # per layer kind: {"full_attention": {...}, "sliding_attention": {...}} (transformers 5), else the
            # 4.x keys: rope_theta + rope_scaling for the global layers, rope_local_base_freq for the local ones
            per_kind = rope_params if rope_params and any(isinstance(v, dict) for v in rope_params.values()) else {}
            local = dict(per_kind.get("sliding_attention") or {})
            if local.get("rope_type", local.get("type", "default")) != "default":
                raise ValueError("gemma3_text: scaled RoPE on the sliding-window layers is not supported by fastsft "
                                 f"(rope_parameters.sliding_attention = {local})")
            local_theta = local.get("rope_theta", d["rope_local_base_freq"])
            # a flat rope_parameters is not read for gemma3_text (transformers 5 wants the per-kind layout,
            # 4 reads rope_theta/rope_scaling only): the global layers take rope_theta and rope_scaling
            rope = dict(per_kind.get("full_attention") or {})
            rope.update(rope_scaling or {})
        else:
            rope = dict(rope_scaling or rope_params or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise ValueError("per-layer-type rope_parameters are not supported by fastsft")
        rope_theta = rope.pop("rope_theta", None)
        if rope_theta is None:
            rope_theta = d["rope_theta"]
        partial = rope.pop("partial_rotary_factor", None)
        if partial is None:
            partial = d.get("partial_rotary_factor")
        partial = 1.0 if partial is None else partial
        if mt != "phi3" and partial not in (1, 1.0):
            raise _refused("config.json", "partial_rotary_factor", partial, (None, 1, 1.0))
        if mt == "phi3":  # Phi3Config: "su" and "yarn" are older names of longrope; no other type is taken
            phi3_type = rope.pop("type", None) or rope.get("rope_type", "default")
            phi3_type = "longrope" if phi3_type in ("su", "yarn") else phi3_type
            if phi3_type not in ("default", "longrope"):
                raise ValueError(f"phi3: rope type {phi3_type!r} is not one transformers' Phi3Config takes "
                                 "('default', 'longrope')")
            rope["rope_type"] = phi3_type
        rope_type = rope.get("rope_type", rope.get("type"))
        if ROPE_TYPE_ALIASES.get(rope_type, rope_type) in _ROPE_TYPES_WITH_ORIGINAL_CTX \
                and d.get("original_max_position_embeddings") is not None and mt != "gemma3_text":
            # transformers 5 gives a top-level original_max_position_embeddings (Phi-3's spelling) precedence
            rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]

        n_heads = d["num_attention_heads"]
        kw: dict[str, Any] = dict(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or None,
            rms_norm_eps=d["rms_norm_eps"],
            rope_theta=float(rope_theta),
            rope_scaling=rope or None,
            max_position_embeddings=d["max_position_embeddings"],
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            attention_dropout=float(d["attention_dropout"] or 0.0),
            initializer_range=d["initializer_range"],
            hidden_act=act,
            partial_rotary_factor=float(partial),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"),
        )
        if isinstance(kw["torch_dtype"], str) and kw["torch_dtype"].startswith("torch."):
            kw["torch_dtype"] = kw["torch_dtype"][len("torch."):]
        if mt == "llama":
            kw["attention_bias"] = bool(d.get("attention_bias", False))
            kw["mlp_bias"] = bool(d.get("mlp_bias", False))
        elif mt in ("qwen3", *GEMMA_TYPES):
            kw["attention_bias"] = bool(d.get("attention_bias", False))
        elif mt == "qwen2":
            kw["attention_bias"] = True
            kw["o_proj_bias"] = False
        elif mt == "phi3":
            kw["resid_dropout"] = float(d["resid_pdrop"] or 0.0)

        if mt in ("mistral", "phi3"):
            kw["sliding_window"] = d.get("sliding_window")  # every layer (their modeling ignores layer_types)
        elif mt in ("qwen2", "qwen3"):
            if d["use_sliding_window"] and d.get("sliding_window") is not None:
                kw["sliding_window"] = d["sliding_window"]
                layer_types = d.get("layer_types")
                first = next((i for i, t in enumerate(layer_types or ()) if t == "sliding_attention"), None)
                if layer_types and (first is None or any(t != "sliding_attention" for t in layer_types[first:])):
                    kw["layer_types"] = layer_types  # any other pattern, layer by layer
                elif layer_types:
                    kw["max_window_layers"] = first  # "full..., sliding...": what max_window_layers expresses
                else:
                    kw["max_window_layers"] = d["max_window_layers"]
        elif mt in SANDWICH_NORM_TYPES:
            kw["sliding_window"] = d.get("sliding_window")
            kw["layer_types"] = d.get("layer_types")
            if not kw["layer_types"] and mt == "gemma3_text":
                every = d["sliding_window_pattern"]
                kw["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention"
                                     for i in range(kw["num_hidden_layers"])]
            kw["query_pre_attn_scalar"] = d["query_pre_attn_scalar"]
            kw["final_logit_softcapping"] = d.get("final_logit_softcapping")
            if mt == "gemma2":
                kw["attn_logit_softcapping"] = d.get("attn_logit_softcapping")
            else:
                kw["rope_local_theta"] = float(local_theta)
        return cls(**kw)

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "ModelConfig":
        """Read a config.json file (or a directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        with open(p, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset from PRESETS, optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        kw = copy.deepcopy(PRESETS[name])
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        kw = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        kw.update(changes)
        return ModelConfig(**kw)

    def to_hf_dict(self) -> dict:
        """A config.json dict that transformers (4.45+ and 5.x) loads to this architecture."""
        mt = self.model_type
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters.update({k: v for k, v in self.rope_scaling.items() if k != "rope_type"})
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[mt]],
            "model_type": mt,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            # transformers 5 layout ...
            "rope_parameters": rope_parameters,
            # ... and the transformers 4 layout of the same information.
            "rope_theta": self.rope_theta,
            "rope_scaling": copy.deepcopy(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": self.attention_dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.rope_type == "longrope":
            # transformers 4 reads longrope's original context only at the top level (5 reads either)
            d["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        if self.torch_dtype is not None:
            d["dtype"] = self.torch_dtype
            d["torch_dtype"] = self.torch_dtype
        if mt == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif mt in ("qwen3", *GEMMA_TYPES):
            d["attention_bias"] = self.attention_bias
        if mt in SANDWICH_NORM_TYPES:
            d["hidden_activation"] = d.pop("hidden_act")
            d["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            d["final_logit_softcapping"] = self.final_logit_softcapping
            d["attn_logit_softcapping"] = self.attn_logit_softcapping
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types)
        if mt == "gemma3_text":
            # transformers 5: RoPE per layer kind; transformers 4: rope_theta/rope_scaling are the global layers'
            d["rope_parameters"] = {"full_attention": rope_parameters,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta}}
            d["rope_local_base_freq"] = self.rope_local_theta
        if mt == "phi3":
            d["partial_rotary_factor"] = self.partial_rotary_factor
            d["resid_pdrop"] = self.resid_dropout
            d["embd_pdrop"] = 0.0
            d["sliding_window"] = self.sliding_window
            d["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
            if self.rope_scaling is not None and "original_max_position_embeddings" in self.rope_scaling:
                d["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        if mt == "mistral":
            d["sliding_window"] = self.sliding_window
        elif mt in ("qwen2", "qwen3"):
            use_sw = self.sliding_window is not None
            d["use_sliding_window"] = use_sw
            d["sliding_window"] = self.sliding_window
            mwl = self.max_window_layers if self.max_window_layers is not None else 0
            d["max_window_layers"] = mwl if use_sw else self.num_hidden_layers
            d["layer_types"] = [
                "sliding_attention" if self.layer_sliding_window(i) is not None else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
            if self.layer_types is not None and use_sw:  # max_window_layers: the first sliding layer
                d["max_window_layers"] = next((i for i, t in enumerate(self.layer_types) if t == "sliding_attention"),
                                              self.num_hidden_layers)
        return d

    def save_json(self, path: Union[str, Path]) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        with open(p, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=False)
            f.write("\n")


# Named presets (kwargs for ModelConfig). "tiny" is the embedded CPU demo model: a
# ~2.4M-parameter Llama with a byte-level vocabulary (256 bytes + specials, rounded up
# to 272) and GQA (6 query heads sharing 2 kv heads).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        model_type="llama",
        vocab_size=272,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.07,  # ~1/sqrt(hidden): a random base whose logits are not stuck near zero
        # Byte-level tokenizer convention: ids 0..255 are bytes, specials follow.
        bos_token_id=257,  # fastsft.data.ByteTokenizer: <pad>=256, <s>=257, </s>=258
        eos_token_id=258,
        pad_token_id=256,
    ),
    # Even smaller, for unit tests.
    "nano": dict(
        model_type="llama",
        vocab_size=272,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=257,  # fastsft.data.ByteTokenizer: <pad>=256, <s>=257, </s>=258
        eos_token_id=258,
        pad_token_id=256,
    ),
}
