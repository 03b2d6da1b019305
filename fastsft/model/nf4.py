"""Frozen NF4 (QLoRA) linear layers in bitsandbytes' format.

``NF4Linear`` stores ``W [out, in]`` exactly as ``bitsandbytes.functional.quantize_4bit(W,
blocksize=64, quant_type="nf4", compress_statistics=True)`` returns it (format: ``fastsft.kernels.nf4``)
and computes ``y = x W^T + b`` by dequantising ``W`` on every call: the Triton kernel on CUDA, the
plain-torch reference elsewhere. The weight gets no gradient; ``x`` does, and the dense weight is
dequantised again in the backward instead of being kept alive between the two (QLoRA's memory trade).

State dicts use the keys HF transformers / bitsandbytes write for ``Linear4bit`` (``*.bnb-4bit``
checkpoints), so a pre-quantised checkpoint loads with ``load_state_dict``:

    weight                                  uint8 [ceil(n / 2), 1], two codes a byte, high nibble first
    weight.absmax                           uint8 codes (double quant) or float32 scales, one per 64
    weight.quant_map                        float32 [16], the NF4 table
    weight.nested_absmax                    float32, one per 256 absmax values   (double quant only)
    weight.nested_quant_map                 float32 [256], bnb's dynamic map     (double quant only)
    weight.quant_state.bitsandbytes__nf4    uint8 bytes of a JSON object: quant_type, blocksize,
                                            dtype, shape (+ nested_blocksize, nested_dtype,
                                            nested_offset), i.e. ``QuantState.as_dict(packed=True)``
    bias                                    optional, dense

Wrapping an ``NF4Linear`` in ``fastsft.model.lora.LoRALinear`` gives QLoRA: the LoRA layer only
calls the base layer and asks it for ``in_features``/``out_features`` (and ``dequantize()`` to merge).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastsft.kernels import triton_available
from fastsft.kernels.nf4 import nf4_code, nf4_dequantize_ref
from fastsft.model.fused import KernelChoice

__all__ = ["NF4Linear", "QUANT_STATE_KEY", "quantize_weight", "quantize_linears", "target_linear_names"]

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
BLOCKSIZE = 64  # weights per absmax: QLoRA's and HF's default
NESTED_BLOCKSIZE = 256  # absmax values per second-level scale: fixed by bnb's compress_statistics

# quant-state buffers kept float32 whatever ``module.to(dtype)`` says: casting the scales would break
# bit-exactness with bitsandbytes (they are written into the state dict as float32, too)
_FP32_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "bfloat16", as QuantState.as_dict writes it


def _pack_json(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(t.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))


def _canonical_quant_state(qs: Any) -> dict[str, Any]:
    """A ``QuantState``, or its ``as_dict()`` / ``as_dict(packed=True)`` (keys possibly prefixed with
    ``weight.``), as one flat dict with bnb's unpacked key names."""
    if not isinstance(qs, Mapping):
        if not hasattr(qs, "as_dict"):
            raise TypeError(f"expected a QuantState or a dict of its items, got {type(qs).__name__}")
        qs = qs.as_dict()
    flat: dict[str, Any] = {}
    for key, value in qs.items():
        if key.endswith(QUANT_STATE_KEY) or key.endswith("quant_state.bitsandbytes__fp4"):
            if not key.endswith("nf4"):
                raise ValueError("NF4Linear: only NF4 checkpoints are supported, got an FP4 quant state")
            flat.update(_unpack_json(value))
        else:
            flat[key.rsplit(".", 1)[-1]] = value
    missing = [k for k in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape") if k not in flat]
    if missing:
        raise ValueError(f"NF4Linear: incomplete quant state, missing {missing}")
    if flat["quant_type"] != "nf4":
        raise ValueError(f"NF4Linear: only quant_type 'nf4' is supported, got {flat['quant_type']!r}")
    return flat


class _NF4LinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with W dequantised in the forward and again in the backward (nothing dense saved)."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        return F.linear(x, module.dequantize(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ ctx.module.dequantize().to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` replacement whose weight is stored in bitsandbytes NF4 (4.13 bits/weight
    with double quantisation: 4 + 8/64 + 32/(64*256)).

    Args:
        in_features, out_features, bias: as ``nn.Linear``; buffers are zero until loaded/quantised.
        compute_dtype: dtype ``dequantize()`` produces and the matmul runs in.
        double_quant: whether absmax is itself 8-bit quantised (bnb ``compress_statistics``).
    """

    # LoRA wraps any layer that says it is a frozen quantized linear (fastsft.model.lora._is_linear)
    quantized_base = True
    kernel_choice = KernelChoice()  # the "lora" piece covers the Triton dequantize (configure_kernels)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        *,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        self.quant_dtype = compute_dtype  # QuantState.dtype: the dtype bnb dequantises to
        self.blocksize = BLOCKSIZE
        self.nested_blocksize = NESTED_BLOCKSIZE
        n = self.in_features * self.out_features
        n_blocks = -(-n // BLOCKSIZE)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        # non-persistent: _save_to_state_dict/_load_from_state_dict write/read them under bnb's names
        self.register_buffer("quant_map", nf4_code(device or "cpu"), persistent=False)
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device), persistent=False)
            n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax", torch.zeros(n_nested, device=device), persistent=False)
            self.register_buffer("nested_quant_map", torch.zeros(256, device=device), persistent=False)
            self.register_buffer("nested_offset", torch.zeros((), device=device), persistent=False)
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device), persistent=False)
            for name in ("nested_absmax", "nested_quant_map", "nested_offset"):
                self.register_buffer(name, None, persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, double_quant={self.double_quant}")

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16, *,
                    double_quant: bool = True) -> "NF4Linear":
        """Quantise ``linear.weight`` (cast to ``compute_dtype``) with bitsandbytes (see
        :func:`quantize_weight`), on the linear's device."""
        device = linear.weight.device
        packed, qs = quantize_weight(linear.weight.detach().to(compute_dtype), device, double_quant=double_quant)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_quantized_state(packed, qs, bias=bias, compute_dtype=compute_dtype).to(device)

    @classmethod
    def from_quantized_state(cls, weight_packed: torch.Tensor, quant_state: Any, *,
                             bias: torch.Tensor | None = None,
                             compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Build from a packed weight and its quant state: a bnb ``QuantState`` or the dict
        ``QuantState.as_dict()`` / ``as_dict(packed=True)`` gives (keys may carry a ``weight.`` prefix,
        as in a checkpoint). ``compute_dtype`` defaults to the state's dtype."""
        flat = _canonical_quant_state(quant_state)
        shape = tuple(flat["shape"])
        if len(shape) != 2:
            raise ValueError(f"NF4Linear: the quantised weight must be 2-D, got shape {shape}")
        quant_dtype = getattr(torch, flat["dtype"])
        mod = cls(shape[1], shape[0], bias=bias is not None, compute_dtype=compute_dtype or quant_dtype,
                  double_quant="nested_absmax" in flat, device=weight_packed.device)
        mod._set_quant_state(weight_packed, flat)
        if bias is not None:
            mod.bias.data = bias.detach().to(device=weight_packed.device, dtype=mod.compute_dtype).clone()
        return mod

    @torch.no_grad()
    def _set_quant_state(self, weight_packed: torch.Tensor, flat: Mapping[str, Any]) -> None:
        shape = tuple(flat["shape"])
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear: quant state is for shape {shape}, the layer is "
                             f"{(self.out_features, self.in_features)}")
        if int(flat["blocksize"]) != BLOCKSIZE:
            raise ValueError(f"NF4Linear: only supports blocksize {BLOCKSIZE}, got {flat['blocksize']}")
        n = self.in_features * self.out_features
        if weight_packed.dtype != torch.uint8 or weight_packed.numel() != (n + 1) // 2:
            raise ValueError(f"NF4Linear: expected {(n + 1) // 2} packed uint8 bytes, got "
                             f"{weight_packed.numel()} of {weight_packed.dtype}")
        device = self.weight.device
        self.weight = weight_packed.detach().to(device).reshape(-1, 1).clone()
        self.quant_dtype = getattr(torch, flat["dtype"])
        self.quant_map = flat["quant_map"].detach().to(device, torch.float32).clone()
        absmax = flat["absmax"].detach().to(device)
        if "nested_absmax" in flat:
            if absmax.dtype != torch.uint8 or int(flat["nested_blocksize"]) != NESTED_BLOCKSIZE:
                raise ValueError("NF4Linear: double quantisation needs uint8 absmax codes in blocks of 256")
            self.absmax = absmax.clone()
            self.nested_absmax = flat["nested_absmax"].detach().to(device, torch.float32).clone()
            self.nested_quant_map = flat["nested_quant_map"].detach().to(device, torch.float32).clone()
            self.nested_offset = torch.as_tensor(float(flat["nested_offset"]), dtype=torch.float32, device=device)
        else:
            self.absmax = absmax.to(torch.float32).clone()
            self.nested_absmax = self.nested_quant_map = self.nested_offset = None

    # -- serialisation (bnb / HF Linear4bit keys) ----------------------------------------------------------------
    def quant_state_dict(self, packed: bool = True) -> dict[str, Any]:
        """``QuantState.as_dict(packed)`` of this layer's weight (unprefixed keys)."""
        d: dict[str, Any] = {
            "quant_type": "nf4",
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.quant_map,
            "dtype": _dtype_name(self.quant_dtype),
            "shape": (self.out_features, self.in_features),
        }
        if self.double_quant:
            d.update({
                "nested_absmax": self.nested_absmax,
                "nested_blocksize": self.nested_blocksize,
                "nested_quant_map": self.nested_quant_map,
                "nested_dtype": "float32",
                "nested_offset": self.nested_offset.item(),
            })
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        out[QUANT_STATE_KEY] = _pack_json({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)})
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed), bias
        for key, value in self.quant_state_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qprefix = f"{prefix}weight."
        qs = {k[len(qprefix):]: v for k, v in state_dict.items() if k.startswith(qprefix)}
        packed = state_dict.get(f"{prefix}weight")
        if packed is not None and qs:
            try:
                flat = _canonical_quant_state(qs)
                if tuple(packed.shape) != tuple(self.weight.shape):  # let the default copy succeed
                    self.weight = torch.empty(tuple(packed.shape), dtype=torch.uint8, device=self.weight.device)
                self._set_quant_state(packed, flat)
            except (ValueError, KeyError, TypeError) as e:
                error_msgs.append(f"{prefix}weight: {e}")
        elif packed is not None:
            missing_keys.append(f"{qprefix}{QUANT_STATE_KEY}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        consumed = {qprefix + k for k in qs}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in consumed]

    def _apply(self, fn, recurse=True):
        # device moves apply to the float32 quant state, dtype casts (model.to(bfloat16)) do not
        saved = {name: self._buffers.pop(name) for name in _FP32_STATE if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, t in saved.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    # -- compute ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None, *, use_kernel: bool | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` in ``dtype`` (default ``compute_dtype``), bit-identical to
        ``bitsandbytes.functional.dequantize_4bit``. ``use_kernel`` defaults to "on CUDA with Triton"."""
        dtype = dtype or self.compute_dtype
        if use_kernel is None:
            use_kernel = self.weight.is_cuda and triton_available() and self.kernel_choice.use("lora", self.weight)
        if use_kernel:
            from fastsft.kernels.nf4 import nf4_dequantize as impl
        else:
            impl = nf4_dequantize_ref
        return impl(
            self.weight, self.absmax, (self.out_features, self.in_features), dtype,
            code=self.quant_map, blocksize=self.blocksize, nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map, offset=self.nested_offset, nested_blocksize=self.nested_blocksize,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _NF4LinearFunction.apply(x.to(self.compute_dtype), self, bias)
        return y.to(x.dtype)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, device, *, double_quant: bool = True):
    """``(packed, QuantState)`` of ``w`` by ``bitsandbytes.functional.quantize_4bit`` (NF4, blocksize
    64), on ``device`` when it is a GPU (one weight at a time there, never a whole model), else on the
    CPU. Both are bitsandbytes' own quantizer, so the result is its format either way."""
    import bitsandbytes.functional as bnbF

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return bnbF.quantize_4bit(w.to(device), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                      quant_type="nf4")
        except (RuntimeError, NotImplementedError):  # a bitsandbytes build without this device's kernels
            pass
    return bnbF.quantize_4bit(w.to("cpu"), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4")


def target_linear_names(model: nn.Module, target_modules) -> list[str]:
    """The ``nn.Linear`` modules whose last name component is in ``target_modules``, LM head excluded:
    what ``load_in_4bit`` quantizes."""
    from .lora import fuse_target_names, model_fused_projections

    targets = set(fuse_target_names(tuple(target_modules), model_fused_projections(model)))
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in targets and n != "lm_head"]
    if not names:
        raise ValueError(f"load_in_4bit: no linear layer named {sorted(targets)} to quantize")
    return names


@torch.no_grad()
def quantize_linears(model: nn.Module, target_modules, compute_dtype: torch.dtype) -> list[str]:
    """Replace every ``nn.Linear`` whose last name component is in ``target_modules`` by an NF4Linear,
    one layer at a time (each dense weight is freed as soon as its layer is quantized). The LM head
    and embeddings stay in full precision. Returns the replaced module names."""
    names = target_linear_names(model, target_modules)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(getattr(parent, child), compute_dtype))
    return names
