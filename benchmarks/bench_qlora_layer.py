"""One QLoRA decoder layer, fastsft against transformers + peft + bitsandbytes; NF4 dequant bandwidth.

    python benchmarks/bench_qlora_layer.py              # GPU: Llama-3.1-8B layer shapes, 8192 tokens
    python benchmarks/bench_qlora_layer.py --smoke      # CPU: tiny shapes, checks the script

Dequantize: the Triton NF4 kernel (double-quantized absmax) turning a [14336, 4096] weight into bf16,
in bytes moved per second (reads n/2 code bytes + n/64 absmax bytes + the small nested state, writes 2n
bytes) over the device copy bandwidth measured in the same run (``clone`` of a 1 GiB buffer: read +
write bytes per second). Target: at least 80%. bitsandbytes' own ``dequantize_4bit`` is measured beside
it when bitsandbytes is installed.

Layer: one decoder layer with frozen NF4 bases (the same codes for every system: quantized once by
bitsandbytes) and LoRA r=16 on all seven projections, forward + backward of ``sum(y * g)`` for an input
[1, T, D] that requires grad. Systems:

  fastsft            fastsft.model.llama.DecoderLayer, kernels on (fused LoRA QKV/MLP blocks that
                     re-dequantize in the backward, Triton dequant/RMSNorm/RoPE/SwiGLU)
  fastsft-torch      the same layer with kernels off (plain torch paths: the ablation)
  transformers+peft  transformers' LlamaDecoderLayer (SDPA) with bitsandbytes Linear4bit bases and peft
                     LoRA injected (``peft.inject_adapter_in_model``)

Per system: median fwd+bwd milliseconds, peak memory above the inputs (CUDA), and the relative error of
the output, the input gradient and one LoRA gradient against a float32 computation with the dequantized
weights. Results go to benchmarks/results/<date>-<device>-qlora-layer.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import _results  # benchmarks/_results.py (the script's own directory is on sys.path)
import torch

from fastsft import kernel_usage
from fastsft.model import ModelConfig
from fastsft.model.fused import configure_kernels
from fastsft.model.llama import DecoderLayer, RotaryEmbedding
from fastsft.model.lora import apply_lora
from fastsft.model.nf4 import NF4Linear

# Llama-3.1-8B's layer
GPU_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, tokens=8192)
SMOKE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, tokens=48)
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, reps, warmup=2) -> float:
    times = []
    for i in range(warmup + reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# dequantize bandwidth


def dequant_bandwidth(device, reps, out_features, in_features) -> dict:
    import bitsandbytes.functional as bnbF

    from fastsft.kernels.nf4 import nf4_dequantize

    n = out_features * in_features
    w = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    layer = NF4Linear.from_quantized_state(packed.to(device), {k: (v.to(device) if torch.is_tensor(v) else v)
                                                               for k, v in qs.as_dict(packed=True).items()},
                                           compute_dtype=torch.bfloat16)
    args = dict(code=layer.quant_map, blocksize=64, nested_absmax=layer.nested_absmax,
                nested_code=layer.nested_quant_map, offset=layer.nested_offset, nested_blocksize=256)
    moved = n // 2 + layer.absmax.numel() + 4 * (layer.nested_absmax.numel() + 256 + 16) + 2 * n

    def triton_dequant():
        nf4_dequantize(layer.weight, layer.absmax, (out_features, in_features), torch.bfloat16, **args)

    out = {"shape": [out_features, in_features], "bytes_moved": moved}
    if device == "cuda" or _interpreting():
        ms = _median_ms(triton_dequant, device, reps)
        out["fastsft_ms"] = ms
        out["fastsft_gbps"] = moved / ms / 1e6
    try:
        qs_dev = bnbF.QuantState.from_dict(
            {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in qs.as_dict(packed=True).items()}, device=device)
        p_dev = packed.to(device)
        ms = _median_ms(lambda: bnbF.dequantize_4bit(p_dev, qs_dev), device, reps)
        out["bitsandbytes_ms"] = ms
        out["bitsandbytes_gbps"] = moved / ms / 1e6
    except Exception as e:  # noqa: BLE001 - a missing backend is a recorded reason, not a crash
        out["bitsandbytes_error"] = f"{type(e).__name__}: {e}"
    nbytes = (1 << 30) if device == "cuda" else (1 << 24)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = _median_ms(lambda: buf.clone(), device, reps)
    out["copy_gbps"] = 2 * nbytes / ms / 1e6
    if "fastsft_gbps" in out:
        out["fastsft_fraction_of_copy"] = out["fastsft_gbps"] / out["copy_gbps"]
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------
# the layer, three ways


def _projection_dims(shape) -> dict:
    """name -> (out_features, in_features) of the seven projections of a Llama layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def _parent(layer, name: str):
    """The block (attention or MLP) of a decoder layer that holds projection ``name``."""
    return layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp


def _quantized_weights(shape, seed=0) -> dict:
    """name -> (packed codes, QuantState dict, the codes dequantized to float32) for the seven projections."""
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, n) in _projection_dims(shape).items():
        w = (torch.randn(o, n, generator=g) / n**0.5).to(torch.bfloat16)
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        qs = qs.as_dict(packed=True)
        dense = NF4Linear.from_quantized_state(packed, qs, compute_dtype=torch.float32).dequantize()
        out[name] = (packed, qs, dense)
    return out


def _lora_weights(shape, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(RANK, n, generator=g) / n**0.5, torch.randn(o, RANK, generator=g) * 0.02)
            for name, (o, n) in _projection_dims(shape).items()}


def _model_config(shape) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=128, hidden_size=shape["hidden_size"],
                       intermediate_size=shape["intermediate_size"], num_hidden_layers=1,
                       num_attention_heads=shape["num_attention_heads"],
                       num_key_value_heads=shape["num_key_value_heads"], rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=max(8192, shape["tokens"]))


def _fastsft_layer(shape, qweights, lora, device, dtype, dense_fp32=False):
    cfg = _model_config(shape)
    layer = DecoderLayer(cfg, 0)
    for name, (packed, qs, dense) in qweights.items():
        parent = _parent(layer, name)
        if dense_fp32:
            lin = torch.nn.Linear(dense.shape[1], dense.shape[0], bias=False)
            lin.weight.data = dense.clone()
            setattr(parent, name, lin)
        else:
            setattr(parent, name, NF4Linear.from_quantized_state(packed, qs, compute_dtype=dtype))
    layer = layer.to(device)
    if dense_fp32:
        layer = layer.float()
    else:
        layer.input_layernorm.to(dtype)
        layer.post_attention_layernorm.to(dtype)
    apply_lora(layer, r=RANK, alpha=RANK, target_modules=list(TARGETS))
    for name, (a, b) in lora.items():
        parent = _parent(layer, name)
        m = getattr(parent, name)
        m.lora_A.weight.data = a.to(device)
        m.lora_B.weight.data = b.to(device)
    rotary = RotaryEmbedding(cfg)

    def run(x):
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = rotary(pos, x.dtype)
        return layer(x, cos, sin, None)

    return layer, run


def _hf_layer(shape, qweights, lora, device, dtype):
    import bitsandbytes as bnb
    import peft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_attention_heads=shape["num_attention_heads"],
                      num_key_value_heads=shape["num_key_value_heads"], rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=max(8192, shape["tokens"]), num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to(device=device, dtype=dtype)
    for name, (packed, qs, _) in qweights.items():
        parent = _parent(layer, name)
        old = getattr(parent, name)
        lin = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=dtype,
                                quant_type="nf4", compress_statistics=True, device=device)
        lin.weight = bnb.nn.Params4bit.from_prequantized(
            data=packed.to(device), quantized_stats={k: (v.to(device) if torch.is_tensor(v) else v) for k, v in qs.items()},
            requires_grad=False, device=device)
        setattr(parent, name, lin)
    layer = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS)), layer)
    for name, (a, b) in lora.items():
        parent = _parent(layer, name)
        m = getattr(parent, name)
        m.lora_A["default"].weight.data = a.to(device=device, dtype=m.lora_A["default"].weight.dtype)
        m.lora_B["default"].weight.data = b.to(device=device, dtype=m.lora_B["default"].weight.dtype)
    rotary = LlamaRotaryEmbedding(cfg).to(device)

    def run(x):
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = rotary(x, pos)
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    return layer, run


def _lora_a_grad(layer) -> torch.Tensor:
    m = layer.mlp.down_proj
    a = m.lora_A["default"] if isinstance(m.lora_A, torch.nn.ModuleDict) else m.lora_A
    return a.weight.grad


def measure_layer(shape, device, dtype, reps) -> list[dict]:
    torch.manual_seed(0)
    qweights, lora = _quantized_weights(shape), _lora_weights(shape)
    T, D = shape["tokens"], shape["hidden_size"]
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, T, D, generator=g)
    dy = torch.randn(1, T, D, generator=g)

    def fwd_bwd(layer, run, x_dtype):
        for p in layer.parameters():
            p.grad = None
        x = x0.to(device, x_dtype, copy=True).requires_grad_()
        y = run(x)
        (y.float() * dy.to(device)).sum().backward()
        return y.detach().float().cpu(), x.grad.float().cpu(), _lora_a_grad(layer).float().cpu()

    ref_layer, ref_run = _fastsft_layer(shape, qweights, lora, device, torch.float32, dense_fp32=True)
    configure_kernels(ref_layer, "off")
    ref = fwd_bwd(ref_layer, ref_run, torch.float32)
    del ref_layer

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    systems = {
        "fastsft": lambda: _fastsft_layer(shape, qweights, lora, device, dtype),
        "fastsft-torch": lambda: _fastsft_layer(shape, qweights, lora, device, dtype),
        "transformers+peft": lambda: _hf_layer(shape, qweights, lora, device, dtype),
    }
    rows = []
    for name, build in systems.items():
        row = {"system": name}
        try:
            layer, run = build()
            if name.startswith("fastsft"):
                configure_kernels(layer, "on" if name == "fastsft" and (device == "cuda" or _interpreting()) else "off")
            kernel_usage.reset()
            got = fwd_bwd(layer, run, dtype)
            if name.startswith("fastsft"):  # which path each piece really took: a row never hides a fallback
                row["kernels_used"] = {k: v for k, v in kernel_usage.snapshot().items() if v["path"] != "unused"}
            row["error_vs_fp32"] = {"output": rel(got[0], ref[0]), "grad_input": rel(got[1], ref[1]),
                                    "grad_lora_A_down": rel(got[2], ref[2])}
            row["ms"] = _median_ms(lambda: fwd_bwd(layer, run, dtype), device, reps)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd(layer, run, dtype)
                torch.cuda.synchronize()
                row["peak_extra_bytes"] = int(torch.cuda.max_memory_allocated() - base)
                row["weights_bytes"] = int(base)
            layer = run = None  # free this system before the next is built
        except Exception as e:  # noqa: BLE001 - a system that cannot run is a row with its reason
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that the script runs")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tokens", type=int, default=None, help="tokens in the layer input (default 8192)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --smoke on a CPU machine", file=sys.stderr)
        return 2
    shape = dict(SMOKE_SHAPE if args.smoke else GPU_SHAPE)
    if args.tokens:
        shape["tokens"] = args.tokens
    reps = 2 if args.smoke else args.reps
    dtype = torch.float32 if args.smoke else torch.bfloat16  # bf16 Triton is unreliable in the interpreter
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = _results.header("qlora-layer", name)
    result["versions"] = _results.dist_versions("torch", "triton", "transformers", "peft", "bitsandbytes")
    result["shape"] = shape
    result["lora_rank"] = RANK
    result["dtype"] = str(dtype).removeprefix("torch.")
    dq = (256, 192) if args.smoke else (14336, 4096)
    try:
        result["dequantize"] = dequant_bandwidth(device, reps, *dq)
    except Exception as e:  # noqa: BLE001
        result["dequantize"] = {"error": f"{type(e).__name__}: {e}"}
    print(result["dequantize"], flush=True)
    result["rows"] = measure_layer(shape, device, dtype, reps)
    _results.write(result, args.out, smoke=args.smoke, suffix="qlora-layer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
