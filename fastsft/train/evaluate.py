"""Held-out evaluation: response-token loss and perplexity, exact match of greedy generations, and the
accuracy of their final answers (``eval.answer_pattern``)."""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter

import numpy as np
import torch

from fastsft.loss import fused_linear_cross_entropy
from fastsft.train.batching import IGNORE_INDEX, collate


@torch.no_grad()
def response_loss(model, store, *, pad_id: int, batch_size: int, max_records: int, device,
                  autocast=contextlib.nullcontext, kernels: str = "auto", inputs=None) -> dict:
    """Mean cross-entropy over the trained (response) tokens of the first ``max_records`` records.
    ``inputs(indices, width) -> dict``: more forward arguments of a batch of records (their images)."""
    was_training = model.training
    model.eval()
    n = min(len(store), max_records)
    total, count = 0.0, 0
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        batch = collate(store, idx, pad_id)
        targets = batch["targets"].to(device)
        extra = inputs(idx, batch["input_ids"].shape[1]) if inputs is not None else {}
        with autocast():
            hidden = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), **extra)
            loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, targets, reduction="sum", kernels=kernels,
                                              softcap=model.config.final_logit_softcapping)
        total += float(loss)
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


@torch.no_grad()
def record_losses(model, store, *, pad_id: int, batch_size: int, device, autocast=contextlib.nullcontext,
                  kernels: str = "auto") -> np.ndarray:
    """float64 [N]: each record's mean cross-entropy over its trained (response) tokens (NaN for a record
    with none), from one no-grad pass through the fused loss with ``reduction="none"``: the curriculum's
    base_loss score. Records go in batches of similar length (less padding)."""
    was_training = model.training
    model.eval()
    out = np.full(len(store), np.nan)
    order = np.argsort(store.lengths, kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate(store, idx, pad_id)
        targets = batch["targets"].to(device)
        with autocast():
            hidden = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device))
            per_token = fused_linear_cross_entropy(hidden, model.lm_head.weight, targets, reduction="none",
                                                   kernels=kernels, softcap=model.config.final_logit_softcapping)
        counts = (targets != IGNORE_INDEX).sum(-1)
        sums = per_token.float().sum(-1)
        out[idx] = torch.where(counts > 0, sums / counts.clamp_min(1), float("nan")).double().cpu().numpy()
    model.train(was_training)
    return out


def first_response(ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The prompt before the first trained token, and the first contiguous run of trained tokens."""
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    if len(trained) == 0 or trained[0] == 0:
        return None
    start = trained[0]
    gaps = np.flatnonzero(np.diff(trained) != 1)
    end = trained[gaps[0]] + 1 if len(gaps) else trained[-1] + 1
    return ids[:start], ids[start:end]


def _stop_ids(tokenizer) -> set[int]:
    """EOS, and the end-of-turn token of the chat template where it is a single token."""
    stops = set(tokenizer.stop_ids)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.token_to_id(tok)
        if tid is not None:
            stops.add(tid)
    return stops


def _answer_text(tokenizer, ids, stops: set[int]) -> str:
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids).strip()


@torch.no_grad()
def greedy_generate(model, prompts: list[np.ndarray], *, pad_id: int, stop_ids: set[int],
                    max_new_tokens: int, device, autocast=contextlib.nullcontext,
                    use_cache: bool = True, inputs=None, suppress_ids=()) -> list[list[int]]:
    """Greedy continuations of left-padded prompts. With ``use_cache`` (the default) the prompts run
    once and each new token is one token's forward against the model's `KVCache` (linear in the answer
    length); without it every step runs the whole sequence again (the reference the cache is tested
    against). ``inputs(width) -> dict``: more forward arguments of the left-padded prompts when they are
    ``width`` tokens wide (their images), given to every forward that sees the prompts. ``suppress_ids`` are
    never generated (an image placeholder: no image would stand behind it)."""
    from fastsft.model.llama import KVCache

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    cache = KVCache() if use_cache else None
    new = ids
    suppress = torch.tensor(sorted(suppress_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        with autocast():
            if cache is not None:
                extra = inputs(ids.shape[1]) if inputs is not None and step == 0 else {}
                hidden = model(new, attention_mask=mask, kv_cache=cache, **extra)
            else:
                hidden = model(ids, attention_mask=mask, **(inputs(ids.shape[1]) if inputs is not None else {}))
            logits = model.logits(hidden[:, -1])
            if len(suppress):
                logits[:, suppress] = float("-inf")
            next_ids = logits.argmax(-1)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(next_ids[row]))
        done |= torch.isin(next_ids, stops)
        if bool(done.all()):
            break
        new = next_ids[:, None]
        ids = torch.cat([ids, new], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def extract_answer(pattern: re.Pattern | str, text: str) -> str | None:
    """The final answer in ``text``: the first match of ``pattern`` (its first group when it has one),
    without thousands separators or a trailing period; None when there is none."""
    m = re.search(pattern, text)
    if m is None:
        return None
    answer = m.group(1) if m.re.groups else m.group(0)
    return None if answer is None else answer.strip().replace(",", "").rstrip(".")


def same_answer(expected: str, got: str | None) -> bool:
    """Equal as numbers when both are numbers (``72`` == ``72.0``), else as text."""
    if got is None:
        return False
    try:
        return float(expected) == float(got)
    except ValueError:
        return expected == got


def exact_match(model, tokenizer, store, *, n: int, max_new_tokens: int, batch_size: int, device,
                autocast=contextlib.nullcontext, answer_pattern: str = "", inputs=None, suppress_ids=()) -> dict:
    """Fraction of the first ``n`` held-out records whose first response is generated exactly; with
    ``answer_pattern``, also the fraction (``answer_accuracy``) of those whose expected response has an
    answer that the generated one gives too. ``inputs(indices, width, left_pad, prompt_lengths) -> dict``:
    more forward arguments of the left-padded prompts of records ``indices`` (their images)."""
    was_training = model.training
    model.eval()
    stops = _stop_ids(tokenizer)
    pairs = [(i, first_response(*store[i])) for i in range(min(n, len(store)))]
    records = np.array([i for i, p in pairs if p is not None], dtype=np.int64)
    pairs = [p for _, p in pairs if p is not None]
    hits, samples = 0, []
    answers, answer_hits = 0, 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        prompt_inputs = None
        if inputs is not None:
            lengths = np.array([len(p) for p, _ in chunk])
            idx = records[s : s + batch_size]
            prompt_inputs = (lambda width, idx=idx, lengths=lengths:  # noqa: E731 - bound per chunk
                             inputs(idx, width, lengths.max() - lengths, lengths))
        gens = greedy_generate(model, [p for p, _ in chunk], pad_id=tokenizer.pad_id, stop_ids=stops,
                               max_new_tokens=max_new_tokens, device=device, autocast=autocast,
                               inputs=prompt_inputs, suppress_ids=suppress_ids)
        for (prompt, ref), gen in zip(chunk, gens):
            want, got = _answer_text(tokenizer, ref, stops), _answer_text(tokenizer, gen, stops)
            hits += want == got
            sample = {"prompt": tokenizer.decode(list(prompt)), "expected": want, "generated": got}
            if answer_pattern:
                expected = extract_answer(answer_pattern, want)
                if expected is not None:  # a record without an answer to find does not count
                    found = extract_answer(answer_pattern, got)
                    answers += 1
                    answer_hits += same_answer(expected, found)
                    sample.update(expected_answer=expected, generated_answer=found)
            if len(samples) < 3:
                samples.append(sample)
    model.train(was_training)
    out = {"exact_match": hits / max(len(pairs), 1), "records": len(pairs), "samples": samples}
    if answer_pattern:
        out.update(answer_accuracy=answer_hits / max(answers, 1), answer_records=answers)
    return out


def majority_baseline(tokenizer, train_store, eval_store, *, n: int, max_train: int = 20000) -> float:
    """Exact match of always answering the most common training response: the trivial baseline."""
    stops = _stop_ids(tokenizer)

    def answers(store, limit):
        out = []
        for i in range(min(limit, len(store))):
            pair = first_response(*store[i])
            if pair is not None:
                out.append(_answer_text(tokenizer, pair[1], stops))
        return out

    train_answers = answers(train_store, max_train)
    eval_answers = answers(eval_store, n)
    if not train_answers or not eval_answers:
        return 0.0
    top = Counter(train_answers).most_common(1)[0][0]
    return sum(a == top for a in eval_answers) / len(eval_answers)
