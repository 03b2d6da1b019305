"""Route a transformers ``*ForCausalLM``'s training loss through fastsft's fused linear cross-entropy.

    model = AutoModelForCausalLM.from_pretrained(...)
    fastsft.integrations.hf.patch(model)        # or patch(peft_model): the inner ForCausalLM is patched
    Trainer(model=model, ...).train()           # HF Trainer, TRL SFTTrainer or a hand-written loop

What the patch does
-------------------
``patch`` replaces ``forward`` **on the instance** (a bound wrapper in ``model.__dict__``; the class
and every other model are untouched) of the underlying ``*ForCausalLM`` (found through PEFT's
``PeftModel``/``LoraModel`` and ``.module`` wrappers). The wrapper keeps the class ``forward``'s
signature (``functools.wraps``), so ``Trainer`` still sees ``**kwargs`` and passes
``num_items_in_batch`` (``model_accepts_loss_kwargs`` stays True) and ``generate`` still validates
its kwargs. Per call:

* **training** (``model.training`` and ``labels``/``shift_labels`` given): run the backbone
  (``model.base_model``: gradient checkpointing, PEFT input-grad hooks and ``use_cache`` behave as
  usual), then ``fastsft.loss.fused_linear_cross_entropy`` on the last hidden states and the LM-head
  weight/bias. The loss matches HF's ``ForCausalLMLoss``: unshifted ``labels`` are shifted
  (``shift=True``), ``shift_labels`` are used as given, ``num_items_in_batch`` divides the sum,
  ``ignore_index`` (default -100) is honoured. The output has ``loss`` and **``logits=None``**.
  The config's final-logit soft-capping (``final_logit_softcapping``/``logit_softcapping``/
  ``logits_softcapping``) is passed as ``softcap``; a head bias is passed as ``bias``; tied
  embeddings need nothing (``lm_head.weight`` *is* the embedding). Cohere's ``logit_scale`` and
  Granite's ``logits_scaling`` are folded into the hidden states and bias; any other logit-scaling
  config is refused at ``patch`` time rather than trained wrongly.
* **eval / generation / no labels**: the original forward, unchanged (logits as before).
* **fallbacks to the original forward** (correct, but materialises logits): a non-zero
  ``logits_to_keep`` together with labels; MoE models asked for router logits (the load-balancing
  loss lives in the original forward); and an LM head that is not a plain ``nn.Linear`` -- notably a
  **PEFT LoRA layer on ``lm_head``** (``lm_head`` in ``target_modules``): its output is
  ``W h + s B A dropout(h)``, which is not one fixed matrix, and using the merged weight would
  give wrong gradients under dropout, so the original forward is used and a warning is emitted once.
  A PEFT ``modules_to_save`` copy of ``lm_head`` *is* supported (the active copy's weight is used).

TRL ``SFTTrainer`` (TRL >= 1.x fused LM head)
--------------------------------------------
TRL's ``SFTTrainer.__init__`` calls ``trl.trainer.utils.add_fused_lm_head`` on the model, which
replaces ``model.forward`` with its own wrapper; ``compute_loss`` then calls
``model(**inputs, fused_lm_head=True)`` and builds the loss from ``outputs.log_probs`` (per-token
next-token log-probabilities, ``[B, T-1]`` for unshifted labels or ``[B, T]`` with ``shift_labels``,
zero on ignored positions) and reads ``label_mask``, ``entropy`` and ``is_top1`` for its metrics.
fastsft plugs in by **implementing that protocol in the patched forward**: with ``fused_lm_head=True``
it returns an output with ``log_probs = -fused_linear_cross_entropy(..., reduction="none")`` (so the
loss and its gradient go through fastsft), ``label_mask``, ``loss``, and the metric fields computed
under ``no_grad`` from the kept rows only (one extra chunked head matmul over response tokens; pass
``patch(model, trl_metrics=False)`` to skip it -- the metrics are then logged as NaN).
The patch order does not matter:

* patch **after** ``SFTTrainer(...)`` (``patch(trainer.model)``): our wrapper sits outside TRL's and
  answers ``fused_lm_head=True`` itself, using the outputs TRL asked for (read from TRL's wrapper);
* patch **before** (the usual ``patch(model); SFTTrainer(model=model)``): ``patch`` installs a
  small shim on the ``add_fused_lm_head`` name that ``trl.trainer.sft_trainer`` uses (now if that
  module is loaded, else when it is first imported). For a fastsft-patched model the shim records
  the requested outputs and leaves the forward alone; for any other model it calls TRL's function
  unchanged.

Settings fastsft does not reproduce -- ``temperature != 1``, ``cast_lm_head_to_fp32``, outputs
other than log_probs/entropy/is_top1/log_sum_sq_probs/mean_logits -- leave TRL's own head in
charge (with a warning). Only ``SFTTrainer`` is shimmed: TRL's RL/preference trainers (DPO, GRPO, ...)
want temperatures and differentiable entropies, so they keep TRL's head. Note on fastsft's
entropy: it is detached (SFTTrainer only logs it).

``unpatch(model)`` restores the previous forward. If something re-wrapped ``forward`` after the
patch (e.g. accelerate's mixed-precision wrapper), the fastsft wrapper is switched to a pass-through
instead, so the outer wrapper keeps working. ``patch`` is idempotent.

Differences from HF's loss: when every label is ignored HF's mean is NaN, fastsft's is 0.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastsft import loss as _loss

__all__ = ["patch", "unpatch", "is_patched"]

_STATE_ATTR = "_fastsft_hf_patch"  # the latest patch of this instance
_ALL_STATES_ATTR = "_fastsft_hf_patches"  # {wrapper function: state}, superseded ones included
# Fields of TRL's FusedCausalLMOutput that the patched forward can produce.
_TRL_SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits"})
# What TRL 1.16's SFTTrainer asks for, used when the request is unknown.
_TRL_DEFAULT_OUTPUTS = ("log_probs", "entropy", "is_top1")
_SOFTCAP_ATTRS = ("final_logit_softcapping", "logit_softcapping", "logits_softcapping")
# Bytes of float32 logits per chunk when computing TRL's metric fields (no grad).
_METRIC_CHUNK_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# model discovery


def _unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside ``model`` (PEFT wrappers, ``.module`` wrappers)."""
    m = model
    for _ in range(8):
        inner = None
        get_base = getattr(type(m), "get_base_model", None)
        if get_base is not None and "peft" in type(m).__module__:
            inner = m.get_base_model()  # PeftModel / PeftModelForCausalLM
        elif "peft" in type(m).__module__ and isinstance(getattr(m, "model", None), nn.Module):
            inner = m.model  # LoraModel / BaseTuner
        elif hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
            inner = m._orig_mod  # torch.compile
        elif type(m).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(m, "module"):
            inner = m.module
        if inner is None or inner is m:
            break
        m = inner
    return m


def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _softcap(cfg):
    for name in _SOFTCAP_ATTRS:
        value = getattr(cfg, name, None)
        if value is not None:
            return float(value)
    return None


def _logit_scale(model) -> float:
    """Multiplier the model's forward applies to ``lm_head(h)`` (before any soft-capping)."""
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", "") or ""
    if model_type.startswith("cohere"):
        return float(getattr(model, "logit_scale", None) or getattr(cfg, "logit_scale", 1.0) or 1.0)
    if model_type.startswith("granite"):
        return 1.0 / float(getattr(cfg, "logits_scaling", 1.0) or 1.0)
    for name in ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier"):
        value = getattr(cfg, name, None)
        if value is not None and float(value) != 1.0:
            raise TypeError(
                f"fastsft.integrations.hf.patch: {type(model).__name__} scales its logits "
                f"(config.{name}={value}); this patch does not know how, so it refuses rather than "
                "train a different loss"
            )
    return 1.0


def _backbone(model):
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        return None
    return backbone


def _lm_head(model):
    head = getattr(model, "lm_head", None)
    if head is None:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
    return head


def _resolve_head(head):
    """``(weight, bias)`` of the effective linear head, or ``None`` when it is not a plain linear map."""
    for _ in range(4):
        if type(head).__name__ == "ModulesToSaveWrapper":  # PEFT modules_to_save: mirror its forward
            active = list(getattr(head, "active_adapters", []) or [])
            adapters = getattr(head, "_adapters", set(active))
            if head.disable_adapters or not active or any(a not in adapters for a in active):
                head = head.original_module
            else:
                head = head.modules_to_save[active[0]]
            continue
        break
    if not isinstance(head, nn.Linear) or "peft" in type(head).__module__:
        return None  # LoRA/DoRA/trainable-token layers and other exotic heads
    return head.weight, head.bias


# --------------------------------------------------------------------------------------------------
# state


@dataclass
class _PatchState:
    original: object  # the callable ``model.forward`` was before the patch (bound)
    had_instance_forward: bool
    trl_metrics: bool = True
    active: bool = True
    wrapper: object = None  # our function (unbound), to recognise our bound method
    trl_outputs: tuple | None = None  # outputs TRL's SFTTrainer asked for (via the shim)
    warned: set = field(default_factory=set)

    def warn_once(self, key, message):
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=4)


def _state(model):
    return model.__dict__.get(_STATE_ATTR)


def _is_current(model, state) -> bool:
    fwd = model.__dict__.get("forward")
    return state is not None and getattr(fwd, "__func__", None) is state.wrapper


def is_patched(model) -> bool:
    """Whether ``model`` (or the ForCausalLM inside it) currently computes its loss through fastsft."""
    inner = _unwrap_causal_lm(model)
    st = _state(inner)
    return st is not None and st.active


def _trl_fused_settings(fn):
    """If ``fn`` is TRL's ``add_fused_lm_head`` wrapper: its (temperature, cast_fp32, outputs), else None."""
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or "trl" not in code.co_filename:
        return None
    try:
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in func.__closure__ or ())))
    except ValueError:
        cells = {}
    return (cells.get("temperature"), cells.get("cast_lm_head_to_fp32"), cells.get("outputs"))


def _trl_request_supported(temperature, cast_fp32, outputs) -> bool:
    return (
        temperature is not None
        and float(temperature) == 1.0
        and not cast_fp32
        and outputs is not None
        and set(outputs) <= _TRL_SUPPORTED_OUTPUTS
    )


# --------------------------------------------------------------------------------------------------
# the forward


def _bind_named(model, args, kwargs) -> dict:
    """All call arguments by name (positional ones mapped through the class forward's signature)."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(type(model).forward)
    bound = sig.bind(model, *args, **kwargs)
    named = {}
    params = sig.parameters
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("fastsft patched forward: variadic positional arguments are not supported")
        else:
            named[name] = value
    named.pop(next(iter(params)), None)  # self
    return named


def _run_backbone(model, named):
    backbone = _backbone(model)
    out = backbone(**named)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return out, hidden


def _head_inputs(model, hidden, weight, bias):
    hidden = hidden.to(weight.device)
    scale = _logit_scale(model)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return hidden, bias


def _wants_router_logits(model, named) -> bool:
    value = named.get("output_router_logits")
    if value is None:
        value = getattr(_text_config(model), "output_router_logits", False)
    return bool(value)


def _train_forward(model, state, named):
    """HF-style training forward: fused loss, no logits. Returns None when it must fall back."""
    logits_to_keep = named.get("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return None
    if _wants_router_logits(model, named):
        state.warn_once("moe", "fastsft: router logits requested (MoE aux loss); using the model's own forward")
        return None
    head = _resolve_head(_lm_head(model))
    if head is None:
        state.warn_once(
            "head",
            "fastsft: lm_head is trained (LoRA or another wrapper on lm_head), and the fused loss only "
            "handles a frozen plain linear head; this model's loss is computed by its own forward, with the "
            "full logits (slower, more memory). Leave lm_head out of the LoRA target_modules to use the fused "
            "loss (modules_to_save=['lm_head'] is fused)",
        )
        return None

    from transformers.modeling_outputs import CausalLMOutputWithPast

    named = dict(named)
    labels = named.pop("labels", None)
    shift_labels = named.pop("shift_labels", None)
    num_items = named.pop("num_items_in_batch", None)
    ignore_index = named.pop("ignore_index", -100)
    return_dict = named.pop("return_dict", None)
    named.pop("logits_to_keep", None)
    named.pop("fused_lm_head", None)

    out, hidden = _run_backbone(model, named)
    weight, bias = head
    hidden, bias = _head_inputs(model, hidden, weight, bias)
    if shift_labels is not None:
        targets, shift = shift_labels, False
    else:
        targets, shift = labels, True
    if torch.is_tensor(num_items):
        num_items = num_items.to(hidden.device)
    loss = _loss.fused_linear_cross_entropy(
        hidden, weight, targets.to(hidden.device), bias,
        ignore_index=ignore_index, num_items=num_items, shift=shift,
        softcap=_softcap(_text_config(model)),
    )
    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


@functools.lru_cache(maxsize=None)
def _fused_output_cls():
    try:
        from trl.trainer.utils import FusedCausalLMOutput

        return FusedCausalLMOutput
    except Exception:  # TRL missing or reorganised: an equivalent container
        from transformers.utils import ModelOutput

        @dataclass
        class FusedCausalLMOutput(ModelOutput):
            loss: torch.Tensor | None = None
            log_probs: torch.Tensor | None = None
            entropy: torch.Tensor | None = None
            log_sum_sq_probs: torch.Tensor | None = None
            mean_logits: torch.Tensor | None = None
            is_top1: torch.Tensor | None = None
            label_mask: torch.Tensor | None = None
            aux_loss: torch.Tensor | None = None

        return FusedCausalLMOutput


@torch.no_grad()
def _row_stats(rows, weight, bias, targets, softcap, wanted):
    """Metric fields for kept rows, chunked so at most a few ``_METRIC_CHUNK_BYTES`` of logits exist."""
    n, vocab = rows.shape[0], weight.shape[0]
    res = {name: [] for name in wanted}
    step = max(1, _METRIC_CHUNK_BYTES // (4 * vocab))
    for s in range(0, n, step):
        z = (rows[s : s + step] @ weight.t()).float()
        if bias is not None:
            z = z + bias.float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logp = torch.log_softmax(z, dim=-1)
        if "entropy" in res:
            res["entropy"].append(-(logp.exp() * logp).sum(-1))
        if "is_top1" in res:
            res["is_top1"].append(z.argmax(-1) == targets[s : s + step])
        if "log_sum_sq_probs" in res:
            res["log_sum_sq_probs"].append(torch.logsumexp(2.0 * logp, dim=-1))
        if "mean_logits" in res:
            res["mean_logits"].append(z.mean(-1))
    empty = {"is_top1": torch.bool}
    return {
        k: torch.cat(v) if v else rows.new_zeros(0, dtype=empty.get(k, torch.float32)) for k, v in res.items()
    }


def _scatter(mask, values, dtype):
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_scatter(mask, values.to(dtype))


def _fused_forward(model, state, named, requested):
    """TRL's ``fused_lm_head=True`` protocol, computed with fastsft's loss."""
    named = dict(named)
    named.pop("fused_lm_head", None)
    labels = named.pop("labels", None)
    shift_labels = named.pop("shift_labels", None)
    num_items = named.pop("num_items_in_batch", None)
    ignore_index = named.pop("ignore_index", -100)
    named.pop("return_dict", None)
    named.pop("logits_to_keep", None)
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs `labels` (or `shift_labels`)")
    named["use_cache"] = False
    head = _resolve_head(_lm_head(model))
    if head is None or _wants_router_logits(model, named):
        if head is None:
            state.warn_once("head", f"fastsft: lm_head is a {type(_lm_head(model)).__name__}, not a plain "
                            "nn.Linear (e.g. LoRA on lm_head); log-probs come from the full logits")
        return _fused_from_logits(model, state, named, labels, shift_labels, num_items, ignore_index, requested)

    out, hidden = _run_backbone(model, named)
    weight, bias = head
    hidden, bias = _head_inputs(model, hidden, weight, bias)
    softcap = _softcap(_text_config(model))
    if shift_labels is not None:
        targets, shift = shift_labels.to(hidden.device), False
        mask = targets != ignore_index
        hs, ts = hidden, targets
    else:
        targets, shift = labels.to(hidden.device), True
        ts = targets[..., 1:]
        mask = ts != ignore_index
        hs = hidden[..., :-1, :]
    per_token = _loss.fused_linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index=ignore_index, reduction="none", shift=shift, softcap=softcap
    )
    if shift:
        per_token = per_token[..., :-1]
    log_probs = -per_token
    fields = {"log_probs": log_probs}
    extra = [k for k in requested if k != "log_probs" and k in _TRL_SUPPORTED_OUTPUTS]
    if extra:
        if state.trl_metrics:
            stats = _row_stats(hs[mask], weight, bias, ts[mask], softcap, extra)
            for k, v in stats.items():
                fields[k] = _scatter(mask, v, torch.bool if k == "is_top1" else torch.float32)
        else:  # metrics switched off: NaN, so nobody mistakes them for measurements
            for k in extra:
                fields[k] = torch.full(mask.shape, float("nan"), device=mask.device)
    denom = mask.sum().clamp(min=1) if num_items is None else num_items
    if torch.is_tensor(denom):
        denom = denom.to(log_probs.device)
    loss = -log_probs.sum() / denom
    return _fused_output_cls()(loss=loss, label_mask=mask, **fields)


def _fused_from_logits(model, state, named, labels, shift_labels, num_items, ignore_index, requested):
    """Fallback for TRL's protocol: full logits from the original forward, then log-softmax."""
    out = state.original(**named)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if shift_labels is not None:
        targets = shift_labels.to(logits.device)
    else:
        logits = logits[..., :-1, :]
        targets = labels.to(logits.device)[..., 1:]
    mask = targets != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    log_probs = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    fields = {"log_probs": log_probs}
    with torch.no_grad():
        if "entropy" in requested:
            fields["entropy"] = (-(logp.exp() * logp).sum(-1)).masked_fill(~mask, 0.0)
        if "is_top1" in requested:
            fields["is_top1"] = (logits.argmax(-1) == targets) & mask
        if "log_sum_sq_probs" in requested:
            fields["log_sum_sq_probs"] = torch.logsumexp(2.0 * logp, dim=-1).masked_fill(~mask, 0.0)
        if "mean_logits" in requested:
            fields["mean_logits"] = logits.float().mean(-1).masked_fill(~mask, 0.0)
    denom = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -log_probs.sum() / denom
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + getattr(_text_config(model), "router_aux_loss_coef", 0.0) * aux
    return _fused_output_cls()(loss=loss, label_mask=mask, aux_loss=aux, **fields)


def _make_wrapper(model):
    # The state is looked up on ``self`` (not closed over) so that ``copy.deepcopy(model)`` gives a copy
    # whose forward calls the copy's own original forward.
    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        state = self.__dict__[_ALL_STATES_ATTR][forward]
        if not state.active:  # superseded or unpatched while wrapped by someone else: pass through
            return state.original(*args, **kwargs)
        fused = kwargs.get("fused_lm_head", False)
        if fused:
            trl = _trl_fused_settings(state.original)
            if trl is not None:  # TRL's head sits under us: reproduce it if we can, else let it run
                if not _trl_request_supported(*trl):
                    state.warn_once("trl", "fastsft: TRL's fused head uses temperature/fp32 cast/outputs fastsft "
                                    "does not reproduce; TRL's own head computes these log-probs")
                    return state.original(*args, **kwargs)
                requested = tuple(trl[2])
            else:
                requested = state.trl_outputs or _TRL_DEFAULT_OUTPUTS
            return _fused_forward(self, state, _bind_named(self, args, kwargs), requested)
        kwargs.pop("fused_lm_head", None)
        if self.training:
            named = _bind_named(self, args, kwargs)
            if named.get("labels") is not None or named.get("shift_labels") is not None:
                out = _train_forward(self, state, named)
                if out is not None:
                    return out
        return state.original(*args, **kwargs)

    return forward


# --------------------------------------------------------------------------------------------------
# public API


def patch(model, *, trl_metrics: bool = True):
    """Make ``model``'s training loss go through fastsft's fused linear cross-entropy; returns ``model``.

    ``model``: a transformers ``*ForCausalLM`` with an ``lm_head``, bare or inside PEFT/DDP wrappers
    (the inner ForCausalLM instance is patched). ``trl_metrics``: compute the entropy/accuracy fields
    TRL's SFTTrainer logs (one extra no-grad head matmul over response tokens); False logs NaN.
    Idempotent. Raises ``TypeError`` for a model without an LM head or backbone.
    """
    inner = _unwrap_causal_lm(model)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"fastsft.integrations.hf.patch expects a torch module, got {type(model).__name__}")
    if _lm_head(inner) is None or not hasattr(inner, "config"):
        raise TypeError(
            f"fastsft.integrations.hf.patch: {type(inner).__name__} has no lm_head; expected a transformers "
            "*ForCausalLM (or a PEFT model wrapping one)"
        )
    if _backbone(inner) is None:
        raise TypeError(
            f"fastsft.integrations.hf.patch: cannot find the backbone of {type(inner).__name__} "
            f"(base_model_prefix={getattr(inner, 'base_model_prefix', None)!r})"
        )
    _logit_scale(inner)  # refuses unknown logit scaling up front
    _install_trl_shim()

    old = _state(inner)
    if old is not None and old.active:
        if _is_current(inner, old) or _trl_fused_settings(inner.__dict__.get("forward")) is None:
            # already patched (possibly under an outer wrapper such as accelerate's autocast, which must stay
            # outermost): nothing to do
            old.trl_metrics = trl_metrics
            return model
        # TRL's fused head was put on top of our wrapper; its fused_lm_head path bypasses us, so wrap it
        # from outside and turn the inner wrapper into a pass-through
        old.active = False
    state = _PatchState(
        original=inner.forward,
        had_instance_forward="forward" in inner.__dict__,
        trl_metrics=trl_metrics,
        trl_outputs=old.trl_outputs if old is not None else None,
    )
    state.wrapper = _make_wrapper(inner)
    inner.__dict__.setdefault(_ALL_STATES_ATTR, {})[state.wrapper] = state
    inner.__dict__[_STATE_ATTR] = state
    inner.forward = types.MethodType(state.wrapper, inner)
    return model


def unpatch(model):
    """Undo :func:`patch` (no-op on an unpatched model); returns ``model``."""
    inner = _unwrap_causal_lm(model)
    state = _state(inner)
    if state is None:
        return model
    state.active = False
    if _is_current(inner, state):
        if state.had_instance_forward:
            inner.forward = state.original
        else:
            inner.__dict__.pop("forward", None)
        inner.__dict__.get(_ALL_STATES_ATTR, {}).pop(state.wrapper, None)
        if not inner.__dict__.get(_ALL_STATES_ATTR, True):
            inner.__dict__.pop(_ALL_STATES_ATTR)
    else:
        warnings.warn(
            "fastsft.integrations.hf.unpatch: forward was wrapped again after patch(); the fastsft wrapper is "
            "now a pass-through inside it",
            stacklevel=2,
        )
    inner.__dict__.pop(_STATE_ATTR, None)
    return model


# --------------------------------------------------------------------------------------------------
# TRL SFTTrainer shim: keep TRL's fused head off fastsft-patched models

_SFT_MODULE = "trl.trainer.sft_trainer"


def _shim_module(module):
    orig = getattr(module, "add_fused_lm_head", None)
    if orig is None or getattr(orig, "_fastsft_original", None) is not None:
        return
    try:
        sig = inspect.signature(orig)
    except (TypeError, ValueError):
        return

    @functools.wraps(orig)
    def add_fused_lm_head(model, *args, **kwargs):
        state = _state(model)
        if state is not None and state.active and _is_current(model, state):
            bound = sig.bind(model, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            temperature = a.get("temperature", 1.0)
            cast = a.get("cast_lm_head_to_fp32", False)
            outputs = tuple(a.get("outputs", ("log_probs",)))
            if _trl_request_supported(temperature, cast, outputs):
                state.trl_outputs = outputs  # our forward answers fused_lm_head=True itself
                return None
            warnings.warn(
                "fastsft: TRL asked for a fused LM head with settings fastsft does not reproduce "
                f"(temperature={temperature}, cast_lm_head_to_fp32={cast}, outputs={outputs}); TRL's head is used",
                stacklevel=2,
            )
        return orig(model, *args, **kwargs)

    add_fused_lm_head._fastsft_original = orig
    module.add_fused_lm_head = add_fused_lm_head


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Shims ``trl.trainer.sft_trainer`` right after it is imported (when patch() ran before)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _SFT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        exec_module = loader.exec_module

        def exec_and_shim(module):
            exec_module(module)
            _shim_module(module)

        loader.exec_module = exec_and_shim
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        return spec


_HOOK = _PostImportHook()


def _install_trl_shim():
    module = sys.modules.get(_SFT_MODULE)
    if module is not None:
        _shim_module(module)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
