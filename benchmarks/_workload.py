"""The training workload every throughput benchmark shares: model shapes, record lengths, records, FLOPs.

Record lengths
    ``data/sft_lengths.json`` holds the (prompt, response) token lengths of every record of GSM8K train
    and CodeAlpaca-2k as fastsft's own pipeline encodes them with the Llama-2 tokenizer (Alpaca
    template, BOS and EOS included; prompt = untrained tokens, response = trained tokens). It is
    derived from ../shared once, here, so that the GPU machine (which has no ../shared) draws from the
    same distribution:

        python benchmarks/_workload.py --write-lengths

Records
    ``synthetic_records(n, ...)`` draws (prompt, response) length pairs with replacement (seeded) and
    writes prompt/completion records of random lowercase text whose byte-level encoding (fastsft's
    built-in ``byte`` tokenizer: one token per ASCII character, plus BOS and EOS) has exactly those
    lengths. Every system reads the same JSONL file through fastsft's data pipeline, so all see the
    same token ids, labels and lengths. Token ids stay below 272, which changes no kernel's work: the
    embedding gather and the LM head cost the same whichever ids they see.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
LENGTHS_FILE = HERE / "data" / "sft_lengths.json"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ----------------------------------------------------------------------------------------------------
# model shapes: the published config.json of each model (architecture only; weights are random)

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

MODELS: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "max_position_embeddings": 131072, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "use_sliding_window": False,
        "sliding_window": 32768, "max_window_layers": 24, "initializer_range": 0.02,
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
    # --smoke: the same two architectures (GQA, llama3 RoPE scaling, Qwen2 biases) at toy size
    "smoke-llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    },
    "smoke-qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": True, "use_sliding_window": False,
        "initializer_range": 0.02,
    },
}
GPU_MODELS = ["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"]
SMOKE_MODELS = ["smoke-llama", "smoke-qwen2"]


def hf_config(name: str) -> dict:
    """The config.json dict of a model shape, with the head_dim every loader agrees on filled in."""
    d = dict(MODELS[name])
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    return d


# ----------------------------------------------------------------------------------------------------
# record lengths


def real_lengths(path: Path = LENGTHS_FILE) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) token lengths of the real records, int64 arrays of equal size."""
    d = json.loads(Path(path).read_text())
    return np.asarray(d["prompt_lengths"], np.int64), np.asarray(d["response_lengths"], np.int64)


def compute_real_lengths(shared: Path = SHARED) -> dict:
    """Encode GSM8K train + CodeAlpaca-2k with fastsft's pipeline and the Llama-2 tokenizer."""
    from fastsft.data import build_dataset, load_tokenizer

    tokenizer = load_tokenizer(str(shared / "tokenizers" / "llama2"))
    specs = [{"path": str(shared / "data" / "gsm8k" / "train.jsonl"), "format": "alpaca",
              "fields": {"instruction": "question", "output": "answer"}},
             {"path": str(shared / "data" / "codealpaca" / "code_alpaca_2k.json"), "format": "alpaca"}]
    prompts, responses = [], []
    for spec in specs:  # no truncation
        store = build_dataset([spec], tokenizer, max_seq_len=1 << 20, skip_bad_records=True, seed=0).train
        trained = store.trained_per_record()
        responses.extend(int(t) for t in trained)
        prompts.extend(int(n - t) for n, t in zip(store.lengths, trained))
    return {
        "what": "(prompt, response) token lengths of GSM8K train + CodeAlpaca-2k: fastsft pipeline, "
                "Alpaca template, Llama-2 tokenizer, BOS in the prompt, EOS in the response",
        "command": "python benchmarks/_workload.py --write-lengths",
        "records": len(prompts), "prompt_lengths": prompts, "response_lengths": responses,
    }


def scaled_lengths(scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The real lengths, optionally shrunk (``--smoke``: toy models get proportionally short records)."""
    p, r = real_lengths()
    if scale != 1.0:
        p = np.maximum(2, np.round(p * scale)).astype(np.int64)
        r = np.maximum(2, np.round(r * scale)).astype(np.int64)
    return p, r


def synthetic_records(n: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """``n`` prompt/completion records of random text with real (prompt, response) token lengths
    under the ``byte`` tokenizer: prompt_len - 1 characters (+ BOS), response_len - 1 (+ EOS)."""
    p, r = scaled_lengths(scale)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(p), size=n)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)  # no spaces: nothing is blank
    out = []
    for i in pick:
        text = letters[rng.integers(0, len(letters), size=int(p[i] + r[i] - 2))].tobytes().decode()
        out.append({"prompt": text[: p[i] - 1], "completion": text[p[i] - 1:]})
    return out


def write_records(path: Path, n: int, seed: int = 0, scale: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in synthetic_records(n, seed, scale)))
    return path


# ----------------------------------------------------------------------------------------------------
# FLOP accounting


@dataclass
class Flops:
    """Model FLOPs of one training step, split by where they come from.

    Per real (non-pad) token, with P the frozen projection weights of all decoder layers (q, k, v, o,
    gate, up, down) and A = sum over adapted projections of r * (d_in + d_out), the LoRA weights:
        forward 2P + 2A; input gradient 2P + 2A; LoRA weight gradient 2A; no weight gradient for
        the frozen P; recompute under gradient checkpointing: one more forward, 2P + 2A.
    Per sequence of L real tokens and per layer, causal attention with H query heads of width d:
        forward 2 L^2 H d (QK^T and PV over the lower triangle), backward twice that, recompute once
        more under checkpointing. Sequences are the records (packing does not attend across them;
        padding is not counted).
    Per response token (a token with a next-token target), the frozen LM head of width D and
    vocabulary V: forward 2DV and input gradient 2DV. Prompt tokens need no logits.
    Embeddings, norms, RoPE and SwiGLU's elementwise work are not counted.
    """

    per_token: float            # decoder projections + LoRA, per real token
    per_response_token: float   # LM head, per token with a target
    per_l2: float               # attention, per sum over sequences of L^2

    def step(self, tokens: float, response_tokens: float, sum_l2: float) -> float:
        return self.per_token * tokens + self.per_response_token * response_tokens + self.per_l2 * sum_l2


def flops_model(cfg: dict, lora_r: int, checkpointing: bool, targets=ALL_LINEAR) -> Flops:
    d, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    h, hkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // h
    shapes = {"q_proj": (d, h * hd), "k_proj": (d, hkv * hd), "v_proj": (d, hkv * hd), "o_proj": (h * hd, d),
              "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    p = layers * sum(a * b for a, b in shapes.values())
    a = layers * sum(lora_r * (din + dout) for name, (din, dout) in shapes.items() if name in targets)
    recompute = 1 if checkpointing else 0
    per_token = (2 * p + 2 * a) * (1 + recompute) + (2 * p + 2 * a) + 2 * a
    per_l2 = layers * 2 * h * hd * (1 + 2 + recompute)
    return Flops(per_token=float(per_token), per_response_token=float(4 * d * cfg["vocab_size"]),
                 per_l2=float(per_l2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="benchmark workload helpers")
    p.add_argument("--write-lengths", action="store_true", help=f"recompute {LENGTHS_FILE.name} from ../shared")
    p.add_argument("--shared", type=Path, default=SHARED)
    args = p.parse_args(argv)
    if args.write_lengths:
        d = compute_real_lengths(args.shared)
        LENGTHS_FILE.parent.mkdir(exist_ok=True)
        LENGTHS_FILE.write_text(json.dumps(d, separators=(",", ":")) + "\n")
        lengths = np.add(d["prompt_lengths"], d["response_lengths"])
        print(f"wrote {LENGTHS_FILE}: {d['records']} records, mean {lengths.mean():.1f} tokens, "
              f"max {lengths.max()}, mean response {np.mean(d['response_lengths']):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
