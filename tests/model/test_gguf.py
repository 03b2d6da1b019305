"""GGUF files as input (`--model path/to/model.gguf`): tiny random models written here with the gguf
package's own writer (as llama.cpp's convert_hf_to_gguf.py lays them out: q/k rows permuted for the
"llama" architecture, tied embeddings as a missing output.weight, a byte-level BPE tokenizer with a chat
template) load into fastsft exactly as transformers' GGUF loading reads them, and everything fastsft
cannot express is one clear line. tests/model/test_real_model.py does the same on a real pretrained GGUF."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastsft.data import load_tokenizer  # noqa: E402
from fastsft.model import load_model  # noqa: E402
from fastsft.model.loading import load_gguf_config  # noqa: E402

try:
    import gguf
    from gguf import GGMLQuantizationType as Q
except ImportError:  # only the "gguf missing" tests run
    gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed (pip install '.[gguf]')")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258 after the 256 bytes
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 272


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table, in byte-level BPE vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (interleaved rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf(model_type="llama", seed=0, **overrides):
    """A tiny random transformers model with its norms and biases off their defaults."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6)
    kw.update(overrides)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kw))
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def write_gguf(path, hf, arch, qtype=None, *, name=None, fields=(), tensors=(), raw_types=()):
    """`hf` as a GGUF file of architecture `arch`: 2-D weights in `qtype` (default F32), the rest F32;
    `fields` are extra (writer method, value) pairs, `tensors` extra (name, array) pairs, `raw_types`
    {gguf tensor name: type} stored without conversion (an unsupported type)."""
    qtype = Q.F32 if qtype is None else qtype
    c = hf.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    params = getattr(c, "rope_parameters", None) or {}
    theta = params.get("full_attention", params).get("rope_theta") or c.rope_theta
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or f"tiny {arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(hd)
    w.add_value_length(hd)
    rope = getattr(c, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: per layer kind
    w.add_rope_dimension_count(int(hd * (rope.get("partial_rotary_factor") or 1.0)))
    w.add_vocab_size(c.vocab_size)
    tokens = _byte_chars() + SPECIALS
    tokens += [f"<unused{i}>" for i in range(c.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))  # normal bytes, control tokens
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    w.add_chat_template(CHATML)
    for method, value in fields:
        getattr(w, method)(value)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], c.num_hidden_layers)
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        module, _, suffix = key.rpartition(".")
        gname = f"{names.get_name(module)}.{suffix}"
        a = t.detach().float().numpy()
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            a = a + 1.0  # llama.cpp's Gemma converters store (1 + w)
        if arch == "llama" and ".q_proj." in key:
            a = _permute(a, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in key:
            a = _permute(a, c.num_key_value_heads)
        if gname in dict(raw_types):
            w.add_tensor(gname, a.astype("int8"), raw_dtype=dict(raw_types)[gname])
        elif a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    for gname, a in tensors:
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return out.logits if hasattr(out, "logits") else model.logits(out)


# ----------------------------------------------------------------------------------------------------
# loading: equal to transformers' GGUF model, and to the model the file was written from


CASES = {  # name: (model_type, gguf architecture, tensor type, general.name, config overrides)
    "llama-f32": ("llama", "llama", "F32", None, {}),
    "llama-q8_0-tied": ("llama", "llama", "Q8_0", None, {"tie_word_embeddings": True}),
    # llama.cpp writes Mistral as "llama"; transformers names it mistral by general.name (and then cannot map
    # its tensors: gguf-py has no "mistral" architecture), so this one is checked against its source only
    "mistral-f32": ("mistral", "llama", "F32", "mistral", {"sliding_window": None}),
    "qwen2-f16": ("qwen2", "qwen2", "F16", None, {}),
    "qwen3-q4_1": ("qwen3", "qwen3", "Q4_1", None, {"head_dim": 128}),  # transformers' Qwen3 default
}


@needs_gguf
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_loads_as_transformers_reads_it(case, tmp_path):
    model_type, arch, qtype, name, overrides = CASES[case]
    hf = tiny_hf(model_type, **overrides)
    path = write_gguf(tmp_path / f"{case}.gguf", hf, arch, Q[qtype], name=name)
    ours = load_model(path).eval()
    assert ours.config.model_type == model_type
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ref = hf if model_type == "mistral" else transformers_gguf(path)
    ids = torch.randint(0, VOCAB, (2, 19))
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), atol=1e-5, rtol=0)
    if qtype == "F32":  # lossless: exactly the weights it was written from (the q/k permutation undone)
        src = hf.state_dict()
        for k, v in ours.state_dict().items():
            assert torch.equal(v, src[k]), k


def _longrope(n):
    return {"short_factor": [1.0 + 0.1 * i for i in range(n)], "long_factor": [1.5 + 0.2 * i for i in range(n)]}


FAMILY_CASES = {  # name: (model_type, gguf architecture, tensor type, config overrides, writer fields, T)
    # llama.cpp's attention scale for Gemma 2/3 below 27B is 1/sqrt(head_dim): query_pre_attn_scalar = head_dim
    "gemma2-f32": ("gemma2", "gemma2", "F32",
                   dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6, attn_logit_softcapping=5.0,
                        tie_word_embeddings=True,
                        final_logit_softcapping=7.0),
                   [("add_sliding_window", 6), ("add_attn_logit_softcapping", 5.0),
                    ("add_final_logit_softcapping", 7.0)], 19),
    "gemma3-q8_0": ("gemma3_text", "gemma3", "Q8_0",
                    dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6, num_hidden_layers=7,
                         tie_word_embeddings=True,
                         final_logit_softcapping=None,
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
                    [("add_sliding_window", 6), ("add_rope_scaling_type", "linear"), ("add_rope_scaling_factor", 2.0)],
                    19),
    "phi3-f32": ("phi3", "phi3", "F32", dict(pad_token_id=0, sliding_window=9), [("add_sliding_window", 9)], 19),
    # Phi-4-mini's layout: 3/4 of each head rotated, longrope past a 32-token original context (T = 40)
    "phi4-longrope": ("phi3", "phi3", "F32",
                      dict(pad_token_id=0, max_position_embeddings=64, original_max_position_embeddings=32,
                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.75, **_longrope(6)}),
                      [("add_rope_scaling_orig_ctx_len", 32), ("add_rope_scaling_attn_factors", 1.1)], 40),
    "qwen2-yarn": ("qwen2", "qwen2", "F32",
                   dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                         "rope_theta": 10000.0, "beta_fast": 16.0, "beta_slow": 2.0}),
                   [("add_rope_scaling_type", "yarn"), ("add_rope_scaling_factor", 4.0),
                    ("add_rope_scaling_orig_ctx_len", 32), ("add_rope_scaling_yarn_beta_fast", 16.0),
                    ("add_rope_scaling_yarn_beta_slow", 2.0)], 19),
}


@needs_gguf
@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_gguf_families_load_as_written(case, tmp_path):
    """Gemma 2/3, Phi-3 (fused qkv / gate_up, longrope factors as tensors, partial rotary) and YaRN
    metadata, as llama.cpp writes them, load to the model they were written from."""
    model_type, arch, qtype, overrides, fields, T = FAMILY_CASES[case]
    hf = tiny_hf(model_type, **overrides)
    if case == "phi4-longrope":  # llama.cpp writes the attention factor; make the source use the same
        hf.config.rope_parameters["attention_factor"] = 1.1
        hf = _reloaded(hf, tmp_path)
    fields = [(m, getattr(gguf.RopeScalingType, v.upper()) if m == "add_rope_scaling_type" else v)
              for m, v in fields]
    tensors = []
    if case == "phi4-longrope":
        tensors = [(f"rope_factors_{k}.weight", np.asarray(v, dtype=np.float32))
                   for k, v in (("long", _longrope(6)["long_factor"]), ("short", _longrope(6)["short_factor"]))]
    path = write_gguf(tmp_path / f"{case}.gguf", hf, arch, Q[qtype], fields=fields, tensors=tensors)
    ours = load_model(path).eval()
    assert ours.config.model_type == model_type
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    atol = {"F32": 1e-5, "Q8_0": 5e-2}[qtype]
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), atol=atol, rtol=0)
    if qtype == "F32":  # lossless but for Gemma's stored (1 + w) norms
        src = hf.state_dict()
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(v, src[k], atol=1e-6, rtol=0, msg=k)


def _reloaded(hf, tmp_path):
    d = tmp_path / "src"
    hf.save_pretrained(d)
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@needs_gguf
def test_qwen3_head_dim_comes_from_the_file(tmp_path):
    # attention.key_length, as llama.cpp reads it (transformers keeps Qwen3Config's default of 128 and fails)
    hf = tiny_hf("qwen3", head_dim=24)
    ours = load_model(write_gguf(tmp_path / "q3.gguf", hf, "qwen3"))
    assert ours.config.head_dim == 24
    ids = torch.randint(0, VOCAB, (2, 11))
    torch.testing.assert_close(logits(ours.eval(), ids), logits(hf, ids), atol=1e-5, rtol=0)


def _llama3_rope_freqs(theta, head_dim, factor, low=1.0, high=4.0, old=8192):
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) for rope_type llama3."""
    import math

    import numpy as np

    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@needs_gguf
def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    # Llama 3.1/3.2 GGUFs carry their RoPE scaling only as the rope_freqs tensor (head_dim 16 and theta
    # 5e5 put frequencies in all three bands of the llama3 rule)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf = tiny_hf("llama", rope_theta=500000.0, rope_scaling=dict(rope), max_position_embeddings=131072)
    path = write_gguf(tmp_path / "l3.gguf", hf, "llama",
                      tensors=[("rope_freqs.weight", _llama3_rope_freqs(500000.0, 16, 8.0))])
    ours = load_model(path).eval()
    assert ours.config.rope_scaling == rope
    ids = torch.randint(0, VOCAB, (1, 64))
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), atol=1e-5, rtol=0)


@needs_gguf
def test_load_in_4bit_quantizes_while_loading(tmp_path):
    pytest.importorskip("bitsandbytes")
    from fastsft.model.nf4 import NF4Linear, quantize_linears

    path = write_gguf(tmp_path / "l.gguf", tiny_hf("llama"), "llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = load_model(path, load_in_4bit=True, target_modules=targets).eval()
    quantized = [n for n, m in ours.named_modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == 2 * len(targets)
    oracle = load_model(path)
    quantize_linears(oracle, targets, compute_dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(logits(ours, ids), logits(oracle.eval(), ids), atol=0, rtol=0)


@needs_gguf
def test_tokenizer_and_chat_template_come_from_the_file(tmp_path):
    path = write_gguf(tmp_path / "l.gguf", tiny_hf("llama"), "llama")
    tok = load_tokenizer(str(path))
    assert tok.name == str(path) and tok.has_chat_template
    assert (tok.bos_id, tok.eos_id) == (257, 258)
    text = tok.render_chat([{"role": "user", "content": "2+2? é"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+2? é<|im_end|>\n<|im_start|>assistant\n"
    ids, _ = tok.encode(text)
    assert ids[0] == 257 and ids.count(258) == 1 and max(ids) < VOCAB
    assert tok.decode(ids, skip_special_tokens=False) == text


# ----------------------------------------------------------------------------------------------------
# what fastsft cannot load: one line each


def _refusal_files(tmp_path):
    hf = tiny_hf("llama")
    bad_freqs = _llama3_rope_freqs(10000.0, 16, 8.0, high=2.0)  # not the llama3 rule fastsft recognises
    yield "phi2", _phi2_file(tmp_path), "GGUF architecture 'phi2' is not supported; fastsft loads GGUF files of"
    yield "i8", write_gguf(tmp_path / "i8.gguf", hf, "llama", raw_types=[("blk.0.attn_q.weight", Q.I8)]), \
        "GGUF tensor type I8 (e.g. blk.0.attn_q.weight) cannot be dequantised"
    yarn = [("add_rope_scaling_type", gguf.RopeScalingType.YARN), ("add_rope_scaling_factor", 4.0)]
    yield "yarn", write_gguf(tmp_path / "y.gguf", hf, "llama", fields=yarn), \
        "yarn rope scaling without llama.rope.scaling.original_context_length"
    yarn_log = yarn + [("add_rope_scaling_orig_ctx_len", 32), ("add_rope_scaling_yarn_log_mul", 0.1)]
    yield "yarn-log-mul", write_gguf(tmp_path / "yl.gguf", hf, "llama", fields=yarn_log), \
        "llama.rope.scaling.yarn_log_multiplier = 0.1"
    yield "window", write_gguf(tmp_path / "w.gguf", hf, "llama", fields=[("add_sliding_window", 64)]), \
        "llama.attention.sliding_window (sliding-window attention)"
    yield "freqs", write_gguf(tmp_path / "f.gguf", hf, "llama", tensors=[("rope_freqs.weight", bad_freqs)]), \
        "rope_freqs.weight is not Llama 3 RoPE scaling"


def _phi2_file(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "phi2.gguf"), "phi2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "phi2.gguf"


@needs_gguf
def test_what_fastsft_cannot_load_is_one_clear_line(tmp_path):
    for what, path, message in _refusal_files(tmp_path):
        with pytest.raises(ValueError) as e:
            load_model(path)
        assert message in str(e.value) and "\n" not in str(e.value), (what, str(e.value))
        assert str(path) in str(e.value)
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        load_gguf_config(not_gguf)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------------------------------
# the command line


def fastsft(*args, env=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastsft", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def one_line_error(proc, prefix):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(prefix), proc.stderr
    return errors[0]


@needs_gguf
def test_cli_trains_from_a_gguf_file_and_exports_it(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf("llama", tie_word_embeddings=True), "llama")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+{i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(24)))
    run = tmp_path / "run"
    proc = fastsft("train", "--model", path, "--data", data, "--fields", "prompt=question,completion=answer",
                   "--format", "prompt_completion", "--train.max_steps", "2", "--eval.exact_match", "2",
                   "--eval.max_new_tokens", "4", "--output.progress", "false", "--output", run)
    assert proc.returncode == 0, proc.stderr
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(path.resolve())
    saved = load_tokenizer(str(run / "adapter"))  # the GGUF's tokenizer and chat template, saved beside it
    assert saved.has_chat_template and saved.encode("<|im_end|>")[0] == [258]

    proc = fastsft("export", "--model", path, "--adapter", run / "adapter", "--out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr  # export reads GGUF bases: fastsft's model with the adapter
    from fastsft.model.lora import load_adapter

    ours = load_model(path)
    load_adapter(ours, run / "adapter")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, VOCAB, (2, 13))
    torch.testing.assert_close(logits(merged, ids), logits(ours.eval(), ids), atol=1e-4, rtol=1e-4)
    assert load_tokenizer(str(tmp_path / "merged")).has_chat_template  # the GGUF's tokenizer travels along


@needs_gguf
def test_cli_unsupported_gguf_is_one_line(tmp_path):
    line = one_line_error(fastsft("train", "--model", _phi2_file(tmp_path), "--output", tmp_path / "run"),
                          "fastsft train: error: model.path")
    assert "GGUF architecture 'phi2' is not supported" in line


def test_gguf_package_missing_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "blocked" / "gguf"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'gguf' (blocked by the test)\")\n")
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")  # never read: the package is missing
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError, match=r"needs the gguf package: pip install 'fastsft\[gguf\]'"):
        load_model(path)
    with pytest.raises(ValueError, match=r"needs the gguf package: pip install 'fastsft\[gguf\]'"):
        load_tokenizer(str(path))
    env = {"PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    line = one_line_error(fastsft("train", "--model", path, "--output", tmp_path / "run", env=env),
                          "fastsft train: error: model.path")
    assert "pip install 'fastsft[gguf]'" in line
