"""LoRA adapters for fastsft models, saved/loaded in PEFT's on-disk format.

``LoRALinear`` wraps a frozen base projection and adds a trainable low-rank update::

    y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))

with ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA). Initialisation follows PEFT's
default (``init_lora_weights=True``): ``lora_A`` kaiming-uniform with ``a=sqrt(5)`` (i.e. U(-1/sqrt(in),
1/sqrt(in)), the ``nn.Linear`` default), ``lora_B`` zeros, so a freshly wrapped model computes exactly
what the base model computes.

The base layer is only ever *called* (and asked for ``in_features``/``out_features``), so a quantised
(e.g. NF4) module can stand in for ``nn.Linear``. Only :meth:`LoRALinear.merged` needs the dense weight;
it uses ``base_layer.dequantize()`` when the base layer provides one.

Adapters are stored exactly like PEFT stores them: ``adapter_config.json`` plus
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.lora_A.weight`` /
``.lora_B.weight``. Adapters written here load with ``peft.PeftModel.from_pretrained`` and adapters
written by PEFT (plain LoRA) load with :func:`load_adapter`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastsft.train.files import process_umask

from .fused import KernelChoice

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_KEY_PREFIX",
    "LoRALinear",
    "apply_lora",
    "lora_modules",
    "lora_state_dict",
    "load_lora_state_dict",
    "trainable_parameters",
    "count_parameters",
    "adapter_config_dict",
    "save_adapter",
    "read_adapter_config",
    "load_adapter",
]

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
_OUTPUT_HEAD_NAMES = ("lm_head",)


# ----------------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------------


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _base_features(base_layer: nn.Module) -> tuple[int, int]:
    try:
        return int(base_layer.in_features), int(base_layer.out_features)
    except AttributeError:
        raise TypeError(
            f"LoRALinear needs a base layer with in_features/out_features, got {type(base_layer).__name__}"
        ) from None


def _base_param(base_layer: nn.Module) -> torch.Tensor | None:
    w = getattr(base_layer, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    return next(iter(base_layer.parameters()), None)


class LoRALinear(nn.Module):
    """A frozen linear(-like) ``base_layer`` plus a trainable rank-``r`` update.

    Args:
        base_layer: the projection to adapt (``nn.Linear`` or any module with ``in_features``,
            ``out_features`` that maps ``[..., in] -> [..., out]``). Its parameters are frozen.
        r: LoRA rank (> 0).
        alpha: LoRA alpha.
        dropout: dropout probability applied to the LoRA branch input.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        lora_dtype: dtype of ``lora_A``/``lora_B``; default: the base weight's dtype when it is a
            floating tensor, else float32.
        generator: optional ``torch.Generator`` (CPU) used to draw ``lora_A`` (for reproducible init).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        lora_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(base_layer, LoRALinear):
            raise TypeError("base_layer is already a LoRALinear")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        in_features, out_features = _base_features(base_layer)
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = alpha
        self.lora_dropout_p = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)

        ref = _base_param(base_layer)
        device = ref.device if ref is not None else torch.device("cpu")
        if lora_dtype is None:
            lora_dtype = ref.dtype if (ref is not None and ref.is_floating_point()) else torch.float32
        self.lora_dropout: nn.Module = nn.Dropout(p=self.lora_dropout_p) if self.lora_dropout_p > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=lora_dtype)
        self.reset_lora_parameters(generator=generator)

    # -- init -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT default init: A ~ kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in)); B = 0.

        A is drawn in float32 on the CPU and then copied, so a given generator gives the same
        values on every device and dtype.
        """
        # kaiming_uniform(a): gain = sqrt(2 / (1 + a^2)), bound = gain * sqrt(3 / fan_in);
        # with a = sqrt(5) that is 1 / sqrt(fan_in).
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    # -- base layer forwarding --------------------------------------------------------------------------------------
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    # -- compute ----------------------------------------------------------------------------------------------------
    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B(A(dropout(x)))`` in the LoRA dtype."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    kernel_choice = KernelChoice()  # fastsft.model.fused.configure_kernels sets it per model
    # False inside adapters_disabled(): the layer is its base (the KL anchor's base forward)
    adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base_layer(x)
        if self.kernel_choice.use("lora", x):
            # the dense (or dequantized) base weight is not kept for the backward, nor is x A^T
            from fastsft.kernels.lora import lora_linear, lora_proj

            w, a, b, bias = lora_proj(self)
            return lora_linear(x, w, bias, a, b, self.scaling, self.lora_dropout_p, self.training)
        result = self.base_layer(x)
        return result + self.lora_delta(x).to(result.dtype)

    # -- merge ------------------------------------------------------------------------------------------------------
    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense floating tensor ``[out, in]`` (dequantising when needed)."""
        deq = getattr(self.base_layer, "dequantize", None)
        if callable(deq):
            w = deq()
        else:
            w = self.base_layer.weight
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(
                f"cannot merge LoRA into {type(self.base_layer).__name__}: its weight is not a floating tensor "
                "and it has no dequantize() method"
            )
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"base weight has shape {tuple(w.shape)}, expected {(self.out_features, self.in_features)}"
            )
        return w

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in float32, shape ``[out, in]``."""
        a = self.lora_A.weight.float()
        b = self.lora_B.weight.float()
        return (b @ a) * self.scaling

    @torch.no_grad()
    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new ``nn.Linear`` holding ``W + scaling * B @ A`` (summed in float32, cast to ``dtype``,
        default the base weight's dtype). The base bias is copied. This module is left unchanged."""
        w = self.dense_base_weight()
        out_dtype = dtype or w.dtype
        merged_w = (w.float() + self.delta_weight().to(w.device)).to(out_dtype)
        bias = self.bias
        lin = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=out_dtype
        )
        lin.weight.copy_(merged_w)
        if bias is not None:
            lin.bias.copy_(bias.to(out_dtype))
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout_p:g}, "
            f"use_rslora={self.use_rslora}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Targeting / applying
# ----------------------------------------------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    """A dense ``nn.Linear``, or a frozen quantized one (``NF4Linear`` sets ``quantized_base``)."""
    if isinstance(module, LoRALinear):
        return False
    return isinstance(module, nn.Linear) or getattr(module, "quantized_base", False)


def _output_head_names(model: nn.Module) -> set[str]:
    names = {n for n in _OUTPUT_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # pragma: no cover - defensive, non-HF models
            head = None
        if head is not None:
            for name, mod in model.named_modules():
                if mod is head:
                    names.add(name)
    return names


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT semantics: a string is a full-name regex; a list matches the full name or its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _normalise_targets(target_modules: str | Iterable[str]) -> str | tuple[str, ...]:
    if isinstance(target_modules, str):
        return target_modules
    targets = tuple(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"target_modules entries must be non-empty strings, got {t!r}")
    return targets


# Fused projections (Phi-3) and the separate ones each stands for (Llama's names).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_target_names(targets: str | Iterable[str], fused: Iterable[str]) -> str | tuple[str, ...]:
    """``targets`` for a model whose layers have the fused projections ``fused`` (Phi-3: qkv_proj and
    gate_up_proj): Llama's separate names stand for the fused one when all its parts are named (so the
    default all-linear list adapts Phi-3 whole); naming some parts only is refused -- one adapter on a
    fused weight cannot be restricted to q and v. A regex (a single string) is left as it is."""
    if isinstance(targets, str):
        return targets
    out = list(targets)
    for name in fused:
        parts = FUSED_PROJECTIONS[name]
        named = [t for t in parts if t in out]
        if not named:
            continue
        if len(named) != len(parts):
            raise ValueError(f"this model fuses {', '.join(parts)} into one {name}: LoRA on {', '.join(named)} "
                             f"alone cannot be expressed; target {name}")
        at = out.index(named[0])
        out = [t for t in out if t not in parts]
        if name not in out:
            out.insert(min(at, len(out)), name)
    return tuple(out)


def model_fused_projections(model: nn.Module) -> set[str]:
    """Which of FUSED_PROJECTIONS ``model``'s modules use."""
    return {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} & set(FUSED_PROJECTIONS)


def find_target_modules(model: nn.Module, target_modules: str | Iterable[str] = DEFAULT_TARGET_MODULES) -> list[str]:
    """Names of the ``nn.Linear`` submodules of ``model`` that ``target_modules`` selects.

    ``"all-linear"`` selects every linear layer except the output head (``lm_head``). The output head
    is only selected when it is named explicitly (``"lm_head"``) or matched by a regex. On a model with
    fused projections, Llama's separate names select the fused ones (see fuse_target_names).
    """
    targets = fuse_target_names(_normalise_targets(target_modules), model_fused_projections(model))
    linear = [n for n, m in model.named_modules() if n and _is_linear(m)]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = _output_head_names(model)
        return [n for n in linear if n not in heads]
    return [n for n in linear if _matches(n, targets)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, every LoRA layer of ``model`` computes its base layer alone: the model is its base, with no
    second copy of the weights (4-bit bases stay the same NF4 weights)."""
    layers = list(lora_modules(model).values())
    for m in layers:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.adapter_enabled = True


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module path: LoRALinear}`` in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Iterable[str] = DEFAULT_TARGET_MODULES,
    use_rslora: bool = False,
    seed: int | None = None,
    lora_dtype: torch.dtype | None = None,
) -> list[str]:
    """Wrap the targeted ``nn.Linear`` submodules of ``model`` in :class:`LoRALinear`, in place.

    Every parameter that is not a LoRA parameter is frozen. Returns the wrapped module names.
    ``target_modules``: a sequence of names matched against the full module name or its last
    components (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a full-name regex string,
    or ``"all-linear"``. ``seed`` makes the ``lora_A`` init reproducible (independent of the global RNG).
    """
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    names = find_target_modules(model, target_modules)
    if not names:
        available = sorted({n for n, m in model.named_modules() if n and _is_linear(m)})
        short = sorted({n.rsplit(".", 1)[-1] for n in available})
        raise ValueError(
            f"apply_lora: target_modules={_normalise_targets(target_modules)!r} matched no nn.Linear module; "
            f"available linear module names: {short} (full names e.g. {available[:8]})"
        )
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        wrapped = LoRALinear(
            base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, lora_dtype=lora_dtype, generator=gen
        )
        wrapped.train(base.training)  # keep the model's train/eval mode (matters for LoRA dropout)
        _set_submodule(model, name, wrapped)
    for mod in lora_modules(model).values():
        mod.lora_A.weight.requires_grad_(True)
        mod.lora_B.weight.requires_grad_(True)
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` (after :func:`apply_lora`: exactly the LoRA A/B weights)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ----------------------------------------------------------------------------------------------------------------------
# State dicts with PEFT key names
# ----------------------------------------------------------------------------------------------------------------------


def _peft_key(module_name: str, which: str) -> str:
    return f"{PEFT_KEY_PREFIX}{module_name}.{which}.weight"


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights keyed like PEFT saves them: ``base_model.model.<path>.lora_{A,B}.weight``.

    The tensors are detached and share storage with the model (clone before mutating)."""
    sd: dict[str, torch.Tensor] = {}
    for name, mod in lora_modules(model).items():
        sd[_peft_key(name, "lora_A")] = mod.lora_A.weight.detach()
        sd[_peft_key(name, "lora_B")] = mod.lora_B.weight.detach()
    return sd


_ADAPTER_NAME_SEGMENT = re.compile(r"\.(lora_[AB])\.default\.weight$")


def _normalise_key(key: str) -> str:
    # Accept the in-memory PEFT naming with the adapter name ("...lora_A.default.weight") as well.
    return _ADAPTER_NAME_SEGMENT.sub(r".\1.weight", key)


@torch.no_grad()
def load_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | None = None
) -> None:
    """Copy PEFT-keyed LoRA weights into the model's :class:`LoRALinear` layers (strict).

    Raises ``ValueError`` naming the key (and ``source``, e.g. the file) on a missing key, an
    unexpected key or a shape mismatch. Values are cast to the parameters' dtype/device."""
    where = f" in {source}" if source else ""
    expected: dict[str, nn.Parameter] = {}
    for name, mod in lora_modules(model).items():
        expected[_peft_key(name, "lora_A")] = mod.lora_A.weight
        expected[_peft_key(name, "lora_B")] = mod.lora_B.weight
    if not expected:
        raise ValueError("load_lora_state_dict: the model has no LoRA layers (call apply_lora first)")
    given: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        nkey = _normalise_key(key)
        if nkey in given:
            raise ValueError(f"duplicate LoRA key {key!r}{where}")
        given[nkey] = value
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        raise ValueError(
            f"unexpected key {unexpected[0]!r}{where}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f"; expected keys like {next(iter(expected))!r}"
        )
    missing = [k for k in expected if k not in given]
    if missing:
        raise ValueError(
            f"missing key {missing[0]!r}{where}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for key, param in expected.items():
        value = given[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"key {key!r}{where} is not a tensor")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"shape mismatch for key {key!r}{where}: got {tuple(value.shape)}, model expects {tuple(param.shape)}"
            )
    for key, param in expected.items():
        param.copy_(given[key].to(device=param.device, dtype=param.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# PEFT adapter directory
# ----------------------------------------------------------------------------------------------------------------------


def _cfg_get(cfg: Any, *names: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    for n in names:
        if isinstance(cfg, Mapping):
            if n in cfg:
                return cfg[n]
        elif hasattr(cfg, n):
            return getattr(cfg, n)
    return default


def _uniform_lora_settings(model: nn.Module) -> dict[str, Any]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers")
    settings = {(m.r, float(m.lora_alpha), m.use_rslora, m.lora_dropout_p) for m in mods.values()}
    if len({s[:3] for s in settings}) != 1:
        raise ValueError(f"LoRA layers have differing (r, alpha, use_rslora): {sorted(settings)}")
    r, alpha, use_rslora, dropout = next(iter(settings))
    return {"r": r, "alpha": alpha, "use_rslora": use_rslora, "dropout": max(s[3] for s in settings)}


def _bare_linear_names(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` names the model had before LoRA was applied (a LoRALinear counts as one)."""
    wrapped = set(lora_modules(model))
    names = []
    for n, m in model.named_modules():
        if n in wrapped:
            names.append(n)
        elif n and _is_linear(m):
            parts = n.split(".")
            if not any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
                names.append(n)
    return names


def _saved_target_modules(model: nn.Module, wrapped: Sequence[str]) -> list[str] | str:
    """Short names when they select exactly the wrapped modules, else an exact full-name regex."""
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    reselected = {n for n in _bare_linear_names(model) if _matches(n, short)}
    if reselected == set(wrapped):
        return short
    return "|".join(re.escape(n) for n in wrapped)


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def adapter_config_dict(
    model: nn.Module,
    *,
    base_model_name_or_path: str | None = None,
    lora_config: Any = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for the LoRA layers of ``model`` (PEFT 0.13+ compatible)."""
    s = _uniform_lora_settings(model)
    if lora_config is not None:
        for key, names in (("r", ("r", "rank")), ("alpha", ("lora_alpha", "alpha")), ("use_rslora", ("use_rslora",))):
            v = _cfg_get(lora_config, *names)
            if v is not None and (float(v) if key == "alpha" else v) != s[key]:
                raise ValueError(f"lora_config.{names[0]}={v!r} does not match the model's LoRA layers ({s[key]!r})")
        d = _cfg_get(lora_config, "lora_dropout", "dropout")
        if d is not None:
            s["dropout"] = float(d)
    wrapped = list(lora_modules(model))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": s["r"],
        "lora_alpha": _int_if_whole(s["alpha"]),
        "lora_dropout": s["dropout"],
        "target_modules": _saved_target_modules(model, wrapped),
        "exclude_modules": None,
        "use_rslora": s["use_rslora"],
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "layer_replication": None,
    }


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary sibling ``.<name>.<random>.tmp-<pid>`` (the PID tells
    a stale one from a live writer's), fsync, mode ``0666 & ~umask`` like any file ``open()`` creates
    (mkstemp's 0600 would hide the adapter from a serving process of another user), then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp-{os.getpid()}", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.chmod(tmp, 0o666 & ~process_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    lora_config: Any = None,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) to ``out_dir``.

    ``lora_config`` (mapping or object; optional) may give ``lora_dropout``/``dropout`` and is checked
    against the model for ``r``/``lora_alpha``/``use_rslora``. Both files are written atomically.
    """
    from safetensors.torch import save as st_save

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config = adapter_config_dict(model, base_model_name_or_path=base_model_name_or_path, lora_config=lora_config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    _atomic_write_bytes(os.path.join(out_dir, ADAPTER_WEIGHTS_NAME), st_save(tensors, metadata={"format": "pt"}))
    _atomic_write_bytes(
        os.path.join(out_dir, ADAPTER_CONFIG_NAME), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    )


_UNSUPPORTED = (
    # (key, value considered "off", message)
    ("use_dora", (False, None), "DoRA"),
    ("fan_in_fan_out", (False, None), "fan_in_fan_out"),
    ("modules_to_save", (None, []), "modules_to_save"),
    ("layers_to_transform", (None, []), "layers_to_transform"),
    ("rank_pattern", (None, {}), "rank_pattern"),
    ("alpha_pattern", (None, {}), "alpha_pattern"),
    ("lora_bias", (False, None), "lora_bias"),
    ("exclude_modules", (None, [], ""), "exclude_modules"),
    ("target_parameters", (None, []), "target_parameters"),
    ("layer_replication", (None, []), "layer_replication"),
    ("trainable_token_indices", (None, [], {}), "trainable_token_indices"),
    ("use_qalora", (False, None), "QA-LoRA"),
)


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``adapter_config.json``; raises ``ValueError``/``FileNotFoundError``."""
    path = os.path.join(os.fspath(adapter_dir), ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {os.fspath(adapter_dir)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' adapters are supported")
    for key, off, what in _UNSUPPORTED:
        if key in cfg and cfg[key] not in off:
            raise ValueError(f"{path}: {what} ({key}={cfg[key]!r}) is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg.get('bias')!r} is not supported (only 'none')")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise ValueError(f"{path}: lora_alpha must be a number, got {cfg.get('lora_alpha')!r}")
    tm = cfg.get("target_modules")
    if not (isinstance(tm, str) and tm) and not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
        raise ValueError(f"{path}: target_modules must be a non-empty list of names or a regex, got {tm!r}")
    return cfg


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike, *, lora_dtype: torch.dtype | None = None
) -> list[str]:
    """Apply the LoRA described by ``adapter_dir/adapter_config.json`` to a bare ``model`` and load
    ``adapter_model.safetensors`` into it. Returns the wrapped module names.

    If the model already has LoRA layers, their settings must match the config and only the weights
    are loaded."""
    adapter_dir = os.fspath(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            raise ValueError(f"{adapter_dir}: only safetensors adapters are supported (found adapter_model.bin)")
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {adapter_dir!r}")
    r = cfg["r"]
    alpha = cfg.get("lora_alpha", 8)
    use_rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    targets = cfg["target_modules"]

    existing = lora_modules(model)
    if existing:
        s = _uniform_lora_settings(model)
        if (s["r"], s["alpha"], s["use_rslora"]) != (r, float(alpha), use_rslora):
            raise ValueError(
                f"{adapter_dir}: model already has LoRA layers with r={s['r']}, alpha={s['alpha']}, "
                f"use_rslora={s['use_rslora']}, the adapter has r={r}, lora_alpha={alpha}, use_rslora={use_rslora}"
            )
        names = list(existing)
        load_lora_state_dict(model, _read_safetensors(weights), source=weights)
        return names

    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    names = apply_lora(
        model, r=r, alpha=alpha, dropout=dropout, target_modules=targets, use_rslora=use_rslora,
        lora_dtype=lora_dtype,
    )
    try:
        load_lora_state_dict(model, _read_safetensors(weights), source=weights)
    except BaseException:
        # leave the model as it was: unwrap and restore requires_grad
        for name in names:
            _set_submodule(model, name, model.get_submodule(name).base_layer)
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        raise
    return names


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors file: {e}") from None
