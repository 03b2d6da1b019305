"""Loss: linear + cross-entropy forward and backward, the plain way against fastsft's.

    python -m pytest benchmarks/bench_loss.py --benchmark-only

Shape: N = 2048 tokens (half masked, as prompt tokens are), hidden D = 512, vocabulary V = 32,000
(Llama-2), a frozen LM head (LoRA training), float32 on the CPU.

Providers (each records tokens/s and the [N, V] logits bytes it avoids or pays in extra_info):
  torch              F.linear + F.cross_entropy: materialises the float32 [N, V] logits and their gradient
  torch-linear-ce    torch.nn.functional.linear_cross_entropy with its default options=None: torch's
                     reference path, linear + cross-entropy again (where the installed torch has it;
                     torch 2.13 does)
  torch-linear-ce-chunked  the same with options=LinearCrossEntropyOptions(): torch's chunked path
                     (gradients in the forward, a chunk of rows at a time)
  fastsft-reference  fastsft.loss.fused_linear_cross_entropy(kernels="off"): the chunked PyTorch path
                     (the CPU path, the oracle and the benchmark ablation), masked rows dropped first
  fastsft-kernel     the same call on the Triton kernel: CUDA only. On the CPU Triton runs only in its
                     interpreter, which measures the interpreter, so it is excluded here;
                     benchmarks/bench_fused_linear_cross_entropy.py measures it on the GPU
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _results
from fastsft.loss import fused_linear_cross_entropy

N, D, V = 2048, 512, 32000


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.5] = -100
    return h, w, y


def _torch(h, w, y):
    return F.cross_entropy(F.linear(h, w), y, ignore_index=-100)


def _fastsft(kernels):
    return lambda h, w, y: fused_linear_cross_entropy(h, w, y, kernels=kernels)


def _bench(benchmark, fn, inputs, name):
    h0, w, y = inputs

    def step():
        h = h0.detach().requires_grad_()
        fn(h, w, y).backward()
        if h.is_cuda:
            torch.cuda.synchronize()
        return h.grad

    grad = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    h = h0.detach().requires_grad_()
    ref = torch.autograd.grad(_torch(h, w, y), h)[0]
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(provider=name, N=N, D=D, V=V, seconds=seconds, throughput=N / seconds,
                                unit="tokens/s", logits_bytes=N * V * 4,
                                max_grad_error=float((grad - ref).abs().max()),
                                note=f"fwd+bwd, N {N} (half masked), D {D}, V {V}, frozen head",
                                versions={**_results.versions("fastsft"), "torch": torch.__version__})


def test_torch(benchmark, inputs):
    _bench(benchmark, _torch, inputs, "torch")


def test_torch_linear_cross_entropy(benchmark, inputs):
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    _bench(benchmark, lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100), inputs, "torch-linear-ce")


def test_torch_linear_cross_entropy_chunked(benchmark, inputs):
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip(f"torch {torch.__version__} has no chunked linear_cross_entropy (LinearCrossEntropyOptions)")
    opts = torch.nn.LinearCrossEntropyOptions()
    _bench(benchmark, lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=opts), inputs,
           "torch-linear-ce-chunked")


def test_fastsft_reference(benchmark, inputs):
    _bench(benchmark, _fastsft("off"), inputs, "fastsft-reference")


def test_fastsft_kernel(benchmark, inputs):
    if not torch.cuda.is_available():
        pytest.skip("the Triton kernel needs CUDA; on the CPU only Triton's interpreter runs it (excluded)")
    h, w, y = (t.cuda() for t in inputs)
    _bench(benchmark, _fastsft("on"), (h.bfloat16(), w.bfloat16(), y), "fastsft-kernel")
