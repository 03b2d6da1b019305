"""Model configuration for fastsft's Llama-family decoder.

`ModelConfig` is a plain dataclass that covers the subset of the Hugging Face
config schema fastsft implements (Llama, Mistral, Qwen2, Qwen3). It reads
config.json files written by both transformers 4.x (top-level `rope_theta` plus
`rope_scaling` with "type"/"rope_type") and transformers 5.x (`rope_parameters`,
which also carries `rope_theta`), and writes a config.json that transformers'
AutoConfig / AutoModelForCausalLM load back to the same architecture.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# model_type -> the HF class name written to config.json "architectures".
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Parameters each rope type needs (besides rope_theta, stored separately).
_ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
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


def _normalize_rope_scaling(rope: Optional[dict]) -> Optional[dict]:
    """Return {"rope_type": t, **params} without rope_theta, or None for plain RoPE."""
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope).__name__}")
    rope = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")} | {
        "rope_type": rope.get("rope_type", rope.get("type", "default"))
    }
    rope_type = rope["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _unsupported_rope_type(rope_type)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by fastsft")
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if k not in rope]
    if missing:
        raise ValueError(f"rope type {rope_type!r} requires {missing} in rope_scaling/rope_parameters")
    if rope_type == "default":
        return None
    return rope


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
    # RoPE scaling: None (plain RoPE) or {"rope_type": "linear"|"llama3", ...params}.
    rope_scaling: Optional[dict] = None
    # Context length the model was trained for (informational; RoPE is computed on the fly).
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
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)

        mt = self.model_type
        if self.qk_norm is None:
            self.qk_norm = mt == "qwen3"
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias if mt in ("llama", "qwen3") else False
        # Reject combinations that the HF class of this model_type cannot express,
        # so that save_pretrained always round-trips.
        if self.qk_norm != (mt == "qwen3"):
            raise ValueError(f"qk_norm={self.qk_norm} is not expressible for model_type {mt!r} (qwen3 only)")
        if mt in ("llama", "qwen3") and self.o_proj_bias != self.attention_bias:
            raise ValueError(f"{mt}: attention_bias applies to q,k,v and o alike; o_proj_bias must equal it")
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
        if self.max_window_layers is not None and layer_idx < self.max_window_layers:
            return None
        return self.sliding_window

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    # --------------------------------------------------------------- factories
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        d = dict(d)
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise _unsupported_model_type(mt)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; fastsft supports: silu")

        # RoPE: transformers 5 writes rope_parameters (with rope_theta inside); older
        # configs use a top-level rope_theta and rope_scaling with "type" or "rope_type".
        rope_params = d.get("rope_parameters")
        rope_scaling = d.get("rope_scaling")
        if rope_params is not None and not isinstance(rope_params, dict):
            raise ValueError("rope_parameters must be a dict")
        if rope_params and any(isinstance(v, dict) for v in rope_params.values()):
            raise ValueError("per-layer-type rope_parameters are not supported by fastsft")
        rope = rope_params if rope_params else rope_scaling
        rope_theta = None
        if rope_params and rope_params.get("rope_theta") is not None:
            rope_theta = rope_params["rope_theta"]
        if rope_theta is None:
            rope_theta = d.get("rope_theta", 10000.0)
        if rope is not None:
            rope = {k: v for k, v in rope.items() if k != "rope_theta"}
            if not rope:
                rope = None

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
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
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
        elif mt == "qwen3":
            kw["attention_bias"] = bool(d.get("attention_bias", False))
        elif mt == "qwen2":
            kw["attention_bias"] = True
            kw["o_proj_bias"] = False

        if mt == "mistral":
            kw["sliding_window"] = d.get("sliding_window")
        elif mt in ("qwen2", "qwen3"):
            if d.get("use_sliding_window", False) and d.get("sliding_window") is not None:
                kw["sliding_window"] = d["sliding_window"]
                layer_types = d.get("layer_types")
                if layer_types:
                    # Only the contiguous "full..., sliding..." pattern that max_window_layers expresses.
                    first = next((i for i, t in enumerate(layer_types) if t == "sliding_attention"), len(layer_types))
                    if any(t != "sliding_attention" for t in layer_types[first:]):
                        raise ValueError("non-contiguous layer_types patterns are not supported by fastsft")
                    kw["max_window_layers"] = first
                else:
                    kw["max_window_layers"] = d.get("max_window_layers", 28)
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
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # transformers 5 layout ...
            "rope_parameters": rope_parameters,
            # ... and the transformers 4 layout of the same information.
            "rope_theta": self.rope_theta,
            "rope_scaling": copy.deepcopy(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.torch_dtype is not None:
            d["dtype"] = self.torch_dtype
            d["torch_dtype"] = self.torch_dtype
        if mt == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif mt == "qwen3":
            d["attention_bias"] = self.attention_bias
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
