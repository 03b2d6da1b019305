"""fastsft.integrations.hf: the drop-in fused loss for transformers models, HF Trainer and TRL SFTTrainer."""

import copy
import importlib
import math
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import transformers

import fastsft.loss
from fastsft.integrations import hf

V = 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(head_dim=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=8)),
    # soft-capped logits + tied embeddings
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(head_dim=8, final_logit_softcapping=2.0, query_pre_attn_scalar=8, sliding_window=16)),
    # logits divided by config.logits_scaling
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, dict(logits_scaling=3.0)),
    # logits multiplied by config.logit_scale (tied embeddings by default)
    "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, dict(logit_scale=0.5)),
}


def tiny(arch="llama", seed=0, **overrides):
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    return model_cls(cfg).float()


def batch(seed=1, b=2, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :6] = -100
    labels[1, 8] = -100
    return ids, labels


@pytest.fixture
def spy(monkeypatch):
    """Records every call to fastsft.loss.fused_linear_cross_entropy (the attribute the patch calls)."""
    real = fastsft.loss.fused_linear_cross_entropy
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastsft.loss, "fused_linear_cross_entropy", wrapper)
    return calls


def head_calls(model):
    """Counts lm_head module calls: a patched training forward never runs the head on all positions."""
    counter = []
    model.get_output_embeddings().register_forward_hook(lambda *a: counter.append(1))
    return counter


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, atol=1e-5):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-4, msg=n)


# ---------------------------------------------------------------------------------------------------
# direct forward


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_forward_matches_hf(arch, spy):
    ref = tiny(arch).train()
    pat = hf.patch(copy.deepcopy(ref)).train()
    ids, labels = batch()
    calls = head_calls(pat)

    out_ref = ref(input_ids=ids, labels=labels)
    out_ref.loss.backward()
    out = pat(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None and calls == [] and len(spy) == 1
    assert abs(out.loss.item() - out_ref.loss.item()) < 1e-5
    assert_grads_close(grads(pat), grads(ref))

    # num_items_in_batch: the sum divided by the external count
    n = torch.tensor(23)
    l_ref = ref(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    l_pat = pat(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    kept = (labels[:, 1:] != -100).sum()
    assert abs(l_pat.item() - l_ref.item()) < 1e-5
    assert abs(l_pat.item() - out.loss.item() * kept.item() / 23) < 1e-5

    # eval: the original forward, logits identical
    ref.eval(), pat.eval()
    with torch.no_grad():
        e_ref, e_pat = ref(input_ids=ids, labels=labels), pat(input_ids=ids, labels=labels)
    assert torch.equal(e_ref.logits, e_pat.logits) and e_ref.loss == e_pat.loss
    assert len(spy) == 2  # only the two training calls went through fastsft


def test_bias_tied_positional_shift_labels_return_dict():
    torch.manual_seed(0)
    ref = tiny(tie_word_embeddings=True).train()
    ref.lm_head = nn.Linear(32, V, bias=True)
    ref.lm_head.weight = ref.model.embed_tokens.weight  # tied, plus a head bias
    pat = hf.patch(copy.deepcopy(ref))
    assert pat.lm_head.weight is pat.model.embed_tokens.weight
    ids, labels = batch()

    ref(ids, labels=labels).loss.backward()
    out = pat(ids, None, labels=labels)  # positional input_ids / attention_mask
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref(ids, labels=labels).loss, atol=1e-5, rtol=0)
    assert_grads_close(grads(pat), grads(ref))
    assert pat.lm_head.bias.grad is not None

    # pre-shifted labels (what padding-free / context-parallel collators pass)
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    a = ref(input_ids=ids, labels=labels, shift_labels=shift).loss
    b = pat(input_ids=ids, labels=labels, shift_labels=shift).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    tup = pat(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.allclose(tup[0], b, atol=1e-5)


def test_logits_to_keep_and_generation_unchanged():
    ref = tiny()
    pat = hf.patch(copy.deepcopy(ref))
    ids, labels = batch()
    ref.train(), pat.train()
    a = ref(input_ids=ids, labels=labels[:, -3:], logits_to_keep=3)  # HF semantics: labels match kept slice
    b = pat(input_ids=ids, labels=labels[:, -3:], logits_to_keep=3)
    assert torch.equal(a.logits, b.logits) and torch.allclose(a.loss, b.loss)
    ref.eval(), pat.eval()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), pat.generate(ids, **kw))


def test_gradient_checkpointing_peft_input_grads_no_cache(spy):
    peft = pytest.importorskip("peft")
    ref = tiny()
    ref.config.use_cache = False
    pat = copy.deepcopy(ref)
    models = []
    for m, do_patch in ((ref, False), (pat, True)):
        if do_patch:
            hf.patch(m)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()
        torch.manual_seed(3)
        pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, init_lora_weights="gaussian"))
        pm.train()
        models.append(pm)
    ids, labels = batch()
    losses = []
    for pm in models:
        out = pm(input_ids=ids, labels=labels)
        out.loss.backward()
        losses.append(out.loss)
    assert models[1](input_ids=ids, labels=labels).logits is None
    assert len(spy) == 2
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    assert_grads_close(grads(models[0]), grads(models[1]))
    assert hf.is_patched(models[1]) and not hf.is_patched(models[0])


def test_lora_on_lm_head_falls_back(spy):
    peft = pytest.importorskip("peft")
    ref = tiny()
    pat = hf.patch(copy.deepcopy(ref))
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, init_lora_weights="gaussian")
    torch.manual_seed(5)
    pr = peft.get_peft_model(ref, cfg)
    torch.manual_seed(5)
    pp = peft.get_peft_model(pat, cfg)
    pr.train(), pp.train()
    ids, labels = batch()
    with pytest.warns(UserWarning, match="lm_head"):
        out = pp(input_ids=ids, labels=labels)
    assert out.logits is not None and spy == []  # documented fallback: the model's own forward
    torch.testing.assert_close(out.loss, pr(input_ids=ids, labels=labels).loss)


def test_modules_to_save_lm_head_is_fused(spy):
    peft = pytest.importorskip("peft")
    ref = tiny()
    pat = hf.patch(copy.deepcopy(ref))
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights="gaussian",
                          lora_dropout=0.0)
    torch.manual_seed(5)
    pr = peft.get_peft_model(ref, cfg)
    torch.manual_seed(5)
    pp = peft.get_peft_model(pat, cfg)
    with torch.no_grad():  # make the trainable copy differ from the frozen original
        for m in (pr, pp):
            m.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pr.train(), pp.train()
    ids, labels = batch()
    a, b = pr(input_ids=ids, labels=labels), pp(input_ids=ids, labels=labels)
    a.loss.backward(), b.loss.backward()
    assert b.logits is None and len(spy) == 1
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    assert_grads_close(grads(pr), grads(pp))


def test_unpatch_idempotent_and_errors():
    m = tiny()
    cls_forward = type(m).forward
    other = tiny(seed=1)
    hf.patch(m)
    first = m.forward
    hf.patch(m)  # harmless
    assert m.forward.__func__ is first.__func__ and hf.is_patched(m)
    assert "forward" not in other.__dict__  # the class and other instances are untouched
    assert type(m).forward is cls_forward
    m.train()
    ids, labels = batch()
    assert m(input_ids=ids, labels=labels).logits is None
    # a deep copy (e.g. a reference model) runs on its own weights
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    twin_loss = twin(input_ids=ids, labels=labels).loss
    twin_loss.backward()
    assert twin.lm_head.weight.grad is not None and m.lm_head.weight.grad is None
    hf.unpatch(twin)
    torch.testing.assert_close(twin_loss, twin(input_ids=ids, labels=labels).loss, atol=1e-5, rtol=0)
    assert m.forward.__self__ is m and hf.is_patched(m)

    hf.unpatch(m)
    assert "forward" not in m.__dict__ and not hf.is_patched(m)
    assert m(input_ids=ids, labels=labels).logits is not None
    hf.unpatch(m)  # no-op

    with pytest.raises(TypeError, match="lm_head"):
        hf.patch(transformers.LlamaModel(transformers.LlamaConfig(**COMMON)))
    with pytest.raises(TypeError, match="lm_head"):
        hf.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="scales its logits"):
        hf.patch(tiny(lm_head_multiplier=2.0))


def test_rewrapped_forward_unpatch_passes_through(spy):
    """Something (e.g. accelerate's autocast) wraps forward after patch(): patch again keeps that wrapper
    outermost, unpatch leaves a pass-through."""
    m = hf.patch(tiny()).train()
    inner = m.forward
    m.forward = lambda *a, **k: inner(*a, **k)
    hf.patch(m)
    assert m.forward.__name__ == "<lambda>"
    ids, labels = batch()
    assert m(input_ids=ids, labels=labels).logits is None and len(spy) == 1
    spy.clear()
    with pytest.warns(UserWarning, match="wrapped again"):
        hf.unpatch(m)
    assert m(input_ids=ids, labels=labels).logits is not None and spy == []


# ---------------------------------------------------------------------------------------------------
# HF Trainer


def _trainer_dataset(n=12, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V, (t,), generator=g)
        labels = ids.clone()
        labels[: 2 + (i * 5) % 8] = -100  # prompt part of varying length: num_items_in_batch matters
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(t, dtype=torch.long)})
    return rows


def _train_hf(tmp_path, patched):
    model = tiny(seed=0)
    if patched:
        hf.patch(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", learning_rate=3e-3,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_trainer_dataset(),
                                   data_collator=transformers.default_data_collator)
    assert trainer.model_accepts_loss_kwargs  # Trainer still sees **kwargs and passes num_items_in_batch
    calls = head_calls(model)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], calls


def test_hf_trainer_patched_matches_unpatched(tmp_path, spy):
    ref, _ = _train_hf(tmp_path / "ref", patched=False)
    assert spy == []
    got, head = _train_hf(tmp_path / "pat", patched=True)
    assert len(ref) == len(got) == 5
    assert len(spy) == 10 and all(c.get("num_items") is not None for c in spy)  # 5 steps x 2 micro-batches
    assert head == []  # the lm_head module never ran: no full logits
    for a, b in zip(ref, got):
        assert math.isclose(a, b, rel_tol=1e-4), (ref, got)
    assert ref[0] != ref[-1]  # the steps really trained


# ---------------------------------------------------------------------------------------------------
# TRL SFTTrainer

WORDS = [f"w{i}" for i in range(V - 4)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<bos>", eos_token="<eos>")


def _sft_dataset(n=12, seed=0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (3 + i % 5 + 4,), generator=g).tolist()]
        k = 3 + i % 5
        rows.append({"prompt": " ".join(words[:k]), "completion": " " + " ".join(words[k:])})
    return datasets.Dataset.from_list(rows)


def _train_sft(tmp_path, mode, use_peft):
    trl = pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    model = tiny(seed=0)
    if mode == "before":
        hf.patch(model)
    peft_config = None
    if use_peft:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                      init_lora_weights="gaussian")
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", learning_rate=3e-3 if not use_peft
        else 3e-2, bf16=False, max_length=32, dataloader_num_workers=0, disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, args=args, train_dataset=_sft_dataset(), processing_class=_tokenizer(),
                             peft_config=peft_config)
    if mode == "after":
        hf.patch(trainer.model)
    assert hf.is_patched(trainer.model) == (mode != "none")
    calls = head_calls(model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    ev = trainer.evaluate(eval_dataset=_sft_dataset(n=4, seed=1))  # eval goes through fused_lm_head=True too
    logs.append({k[len("eval_"):]: v for k, v in ev.items() if k in ("eval_loss", "eval_entropy",
                                                                        "eval_mean_token_accuracy")})
    return logs, calls, trl


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory):
    """Unpatched SFTTrainer runs (TRL's own fused head), computed once per PEFT setting."""
    cache = {}

    def get(use_peft):
        if use_peft not in cache:
            cache[use_peft] = _train_sft(tmp_path_factory.mktemp("sft_ref"), "none", use_peft)[0]
        return cache[use_peft]

    return get


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["before", "after"], ids=["patch_before_trainer", "patch_after_trainer"])
def test_sft_trainer_trains_through_fastsft(tmp_path, spy, sft_reference, mode, use_peft):
    ref = sft_reference(use_peft)
    n_before = len(spy)
    got, head, _ = _train_sft(tmp_path, mode, use_peft)
    ours = spy[n_before:]
    # log_probs came from fastsft: 10 training micro-batches + 1 eval batch
    assert len(ours) == 11 and all(c["reduction"] == "none" for c in ours)
    assert head == []  # lm_head never ran on the full sequence: no logits
    assert len(ref) == len(got) == 6  # 5 training steps + the final evaluation
    for a, b in zip(ref, got):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (ref, got)
        # TRL's metrics, from fastsft's fields
        assert math.isclose(a["entropy"], b["entropy"], rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(a["mean_token_accuracy"], b["mean_token_accuracy"], abs_tol=1e-6)
    assert ref[0]["loss"] != ref[-1]["loss"]


def test_sft_fused_protocol_fields_and_metrics_switch(spy):
    """Direct check of TRL's fused_lm_head protocol against TRL's own head."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    ref = tiny("gemma2")  # softcap + tied
    pat = copy.deepcopy(ref)
    add_fused_lm_head(ref, outputs=("log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits"))
    ids, labels = batch()
    hf.patch(pat)
    # TRL's (unshimmed) helper puts its head on top of ours: its fused path bypasses fastsft...
    add_fused_lm_head(pat, outputs=("log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits"))
    pat(input_ids=ids, labels=labels, fused_lm_head=True)
    assert spy == []
    hf.patch(pat)  # ...so patching again wraps it from outside, and fastsft answers fused_lm_head itself
    a = ref(input_ids=ids, labels=labels, fused_lm_head=True)
    b = pat(input_ids=ids, labels=labels, fused_lm_head=True)
    assert len(spy) == 1 and hf.is_patched(pat)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    assert b.log_probs.shape == (2, 9)

    # pre-shifted labels: [B, T]
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    a = ref(input_ids=ids, labels=labels, shift_labels=shift, fused_lm_head=True)
    b = pat(input_ids=ids, labels=labels, shift_labels=shift, fused_lm_head=True)
    assert b.log_probs.shape == (2, 10)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-5, rtol=1e-5)

    hf.patch(pat, trl_metrics=False)
    b = pat(input_ids=ids, labels=labels, fused_lm_head=True)
    assert torch.isnan(b.entropy).all() and torch.isfinite(b.log_probs).all()
    # without fused_lm_head the forward is the usual one (eval: logits)
    pat.eval()
    assert pat(input_ids=ids).logits.shape == (2, 10, V)


def test_sft_shim_installed_when_trl_imported_later():
    """patch() before trl.trainer.sft_trainer is imported: the post-import hook shims it on import."""
    pytest.importorskip("trl")
    import trl.trainer.sft_trainer  # noqa: F401  (make sure the real module exists)

    name = "trl.trainer.sft_trainer"
    saved = sys.modules.pop(name)
    parent = sys.modules["trl.trainer"]
    saved_attr = parent.__dict__.get("sft_trainer")
    try:
        hf.patch(tiny())
        assert hf._HOOK in sys.meta_path
        fresh = importlib.import_module(name)
        assert fresh is not saved
        assert getattr(fresh.add_fused_lm_head, "_fastsft_original", None) is not None
        assert hf._HOOK not in sys.meta_path
        # the shim leaves unpatched models to TRL
        plain = tiny()
        fresh.add_fused_lm_head(plain)
        assert "forward" in plain.__dict__ and not hf.is_patched(plain)
    finally:
        sys.modules[name] = saved
        if saved_attr is not None:
            parent.__dict__["sft_trainer"] = saved_attr
        if hf._HOOK in sys.meta_path:
            sys.meta_path.remove(hf._HOOK)


def test_trl_head_settings_fastsft_cannot_reproduce_stay_with_trl(spy):
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    ref = tiny()
    pat = copy.deepcopy(ref)
    add_fused_lm_head(ref, temperature=0.7)
    add_fused_lm_head(pat, temperature=0.7)
    hf.patch(pat)
    ids, labels = batch()
    with pytest.warns(UserWarning, match="temperature"):
        b = pat(input_ids=ids, labels=labels, fused_lm_head=True)
    assert spy == []
    torch.testing.assert_close(ref(input_ids=ids, labels=labels, fused_lm_head=True).log_probs, b.log_probs)
