"""Per-layer gradient checkpointing, plain and with the saved layer inputs offloaded to CPU memory:
the gradients are those of the un-checkpointed model (dropout masks and autocast replayed)."""

import pytest
import torch

from fastsft.model import ModelConfig, build_model
from fastsft.model.checkpointing import checkpoint_layer
from fastsft.model.lora import apply_lora

CUDA = torch.cuda.is_available()
CFG = dict(model_type="llama", vocab_size=61, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _model(lora: bool, device="cpu"):
    m = build_model(ModelConfig(**CFG), seed=0).to(device)
    if lora:  # frozen embedding: the first layer's input needs no gradient
        apply_lora(m, r=4, alpha=8, dropout=0.25, seed=0)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3, generator=torch.Generator(device=device).manual_seed(1))
    return m.train()


def _grads(model, checkpointing, offload, autocast=None, device="cpu"):
    model.gradient_checkpointing = checkpointing
    model.offload_activations = offload
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(2)).to(device)
    torch.manual_seed(9)
    ctx = torch.autocast(device, dtype=autocast) if autocast else torch.autocast(device, enabled=False)
    with ctx:
        h = model(ids)
    (h.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [True, False], ids=["lora_dropout", "full"])
@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
def test_checkpointed_gradients_equal_plain(lora, offload):
    model = _model(lora)
    want = _grads(model, False, False)
    got = _grads(model, True, offload)
    assert want.keys() == got.keys()
    for n in want:
        assert want[n] is not None and got[n] is not None, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    if lora:  # the first layer's adapters got gradients although its input needs none
        assert got["model.layers.0.self_attn.q_proj.lora_A.weight"].abs().sum() > 0


def test_offload_replays_autocast():
    model = _model(True)
    want = _grads(model, False, False, autocast=torch.bfloat16)
    got = _grads(model, True, True, autocast=torch.bfloat16)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_offloaded_input_lives_on_the_host():
    """What the node keeps for the backward: the layer input on the CPU (pinned when it came from a
    GPU), and no activation of the layer itself."""
    lin = torch.nn.Linear(8, 8)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    x = torch.randn(5, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = checkpoint_layer(torch.nn.Sequential(lin, torch.nn.ReLU()), x, offload=True)
    assert all(t is lin.weight or t is lin.bias for t in kept)  # params only; x went to ctx host copy
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_offload_on_cuda_matches_and_frees_device_memory():
    model = _model(True, "cuda").to(torch.bfloat16)
    want = _grads(model, True, False, autocast=torch.bfloat16, device="cuda")
    got = _grads(model, True, True, autocast=torch.bfloat16, device="cuda")
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
