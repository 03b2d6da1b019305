"""Epoch order and padded batch assembly."""

import numpy as np
import pytest
import torch

from fastsft.data import TokenStore
from fastsft.loss import fused_linear_cross_entropy
from fastsft.model import build_model
from fastsft.train.batching import IGNORE_INDEX, collate, count_targets, epoch_batches


def _store(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        x = rng.integers(0, 250, n)
        y = x.copy()
        y[: n // 2] = IGNORE_INDEX  # first half is prompt
        ids.append(x)
        labels.append(y)
    return TokenStore.from_records(zip(ids, labels))


@pytest.mark.parametrize("group", [True, False])
def test_epoch_covers_every_record_once_and_is_reproducible(group):
    lengths = np.random.default_rng(1).integers(3, 50, 203)
    a = epoch_batches(lengths, 8, seed=5, epoch=2, group_by_length=group)
    b = epoch_batches(lengths, 8, seed=5, epoch=2, group_by_length=group)
    c = epoch_batches(lengths, 8, seed=5, epoch=3, group_by_length=group)
    flat = np.concatenate(a)
    assert sorted(flat.tolist()) == list(range(203))
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all(len(x) == len(y) and (x == y).all() for x, y in zip(a, c))


def test_collate_shifts_within_each_sequence_and_pads():
    store = _store([5, 11, 3])
    batch = collate(store, np.array([0, 1, 2]), pad_id=256)
    assert batch["input_ids"].shape == (3, 16)  # padded to a multiple of 8
    for row, i in enumerate([0, 1, 2]):
        ids, labels = store[i]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids.tolist()
        assert (batch["input_ids"][row, n:] == 256).all()
        assert batch["targets"][row, : n - 1].tolist() == labels[1:].tolist()
        assert (batch["targets"][row, n - 1 :] == IGNORE_INDEX).all()  # nothing predicted past the end
    assert batch["num_tokens"] == 19
    assert count_targets(batch) == sum(int((store[i][1][1:] != IGNORE_INDEX).sum()) for i in range(3))


def test_accumulated_micro_batches_equal_one_big_batch():
    """Summed losses divided by the step's response-token count: the same gradient however split."""
    store = _store([7, 19, 4, 12, 30, 9, 15, 22], seed=3)
    model = build_model("nano", seed=0)
    weight = model.lm_head.weight

    def grads(groups):
        model.zero_grad()
        batches = [collate(store, np.array(g), pad_id=256) for g in groups]
        num_items = sum(count_targets(b) for b in batches)
        for b in batches:
            hidden = model(b["input_ids"])
            fused_linear_cross_entropy(hidden, weight, b["targets"], reduction="sum", num_items=num_items).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads([list(range(8))])
    split = grads([[0, 1], [2, 3, 4], [5], [6, 7]])
    for g1, g2 in zip(whole, split):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_packed_and_padded_batches_give_the_same_loss_and_gradients():
    """Packing changes the layout, not the loss: same summed loss per response token, same gradients."""
    from fastsft.packing import pack
    from fastsft.train.batching import collate_packed, packed_epoch_batches

    store = _store([7, 19, 4, 12, 30, 9, 15, 22, 3, 11], seed=4)
    model = build_model("nano", seed=0)
    weight = model.lm_head.weight

    def run(batches, packed_args):
        model.zero_grad()
        num_items = sum(count_targets(b) for b in batches)
        total = 0.0
        for b in batches:
            hidden = model(b["input_ids"], position_ids=b["position_ids"], **packed_args(b))
            loss = fused_linear_cross_entropy(hidden, weight, b["targets"], reduction="sum", num_items=num_items)
            loss.backward()
            total += float(loss)
        return total, num_items, [p.grad.clone() for p in model.parameters()]

    padded = run([collate(store, np.arange(10), pad_id=256)], lambda b: {})
    plan = pack(store.lengths, 32, strategy="bfd")
    assert plan.efficiency > 0.8
    batches = [collate_packed(store, plan, bins, 256, 32)
               for bins in packed_epoch_batches(plan.num_bins, 2, seed=0, epoch=0)]
    for b in batches:  # every token slot belongs to one segment
        assert int(b["cu_seqlens"][-1]) == b["input_ids"].numel()
    packed = run(batches, lambda b: {"cu_seqlens": b["cu_seqlens"], "max_seqlen": b["max_seqlen"]})
    assert packed[1] == padded[1]  # the same response tokens are targets
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    for g1, g2 in zip(packed[2], padded[2]):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- order

from fastsft.train.batching import BatchOrder, curriculum_phases, packed_epoch_batches  # noqa: E402


def _records_of(order, unit):
    """The global record indices of one micro-batch."""
    k, units = unit
    local = order.stores[k]
    if order.packing:
        plan = order.plans[k]
        items = np.concatenate([plan.items[plan.bin_offsets[b]:plan.bin_offsets[b + 1]] for b in units])
    else:
        items = np.asarray(units)
    return order.phases[k][items], local


def test_curriculum_phases_split_easy_to_hard():
    scores = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.5, 6.0])
    phases = curriculum_phases(scores, 3)
    assert [p.tolist() for p in phases] == [[1, 3, 5], [2, 4], [0, 6]]
    assert [len(p) for p in curriculum_phases(scores, 10)] == [1] * 7  # never an empty phase


def test_records_without_a_score_are_dealt_evenly_over_the_phases():
    """field:NAME curricula: replay text has no score (NaN); each phase gets its share, never all the last."""
    scores = np.array([np.nan, 3.0, np.nan, 1.0, 2.0, np.nan, 0.0, np.nan, 5.0, 4.0, np.nan, np.nan])
    phases = curriculum_phases(scores, 3)
    assert [p.tolist() for p in phases] == [[0, 2, 3, 6], [1, 4, 5, 7], [8, 9, 10, 11]]
    assert [p.tolist() for p in curriculum_phases(np.full(4, np.nan), 2)] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("packing", [True, False])
def test_without_a_curriculum_the_order_is_the_plain_shuffle(packing):
    """Runs started before BatchOrder existed resume on the same batches."""
    store = _store(np.random.default_rng(2).integers(3, 40, 57))
    order = BatchOrder(store, micro_batch_size=4, seed=7, pad_id=0, packing=packing, max_seq_len=64)
    if packing:
        want = packed_epoch_batches(order.num_units, 4, 7, 3)
    else:
        want = epoch_batches(store.lengths, 4, 7, 3)
    got = order.epoch(3)
    assert [k for k, _ in got] == [0] * len(want)
    assert all(np.array_equal(a, b) for (_, a), b in zip(got, want))


@pytest.mark.parametrize("packing", [True, False])
def test_curriculum_batches_never_mix_phases_and_come_easy_to_hard(packing):
    lengths = np.random.default_rng(3).integers(3, 40, 61)
    store = _store(lengths)
    phases = curriculum_phases(lengths.astype(float), 3)
    order = BatchOrder(store, micro_batch_size=3, seed=1, pad_id=0, packing=packing, max_seq_len=64, phases=phases)
    for e in (0, 1):
        batches = order.epoch(e)
        ks = [k for k, _ in batches]
        assert ks == sorted(ks) and set(ks) == {0, 1, 2}  # the phases in order, every epoch
        seen = []
        for unit in batches:
            records, _ = _records_of(order, unit)
            assert set(records.tolist()) <= set(phases[unit[0]].tolist())  # one phase a batch (and a row)
            seen.extend(records.tolist())
            batch = order.batch(unit)
            assert batch["num_tokens"] == int(lengths[records].sum())
        assert sorted(seen) == list(range(len(lengths)))  # every record once an epoch
    assert [u.tolist() for _, u in order.epoch(1)] == [u.tolist() for _, u in order.epoch(1)]  # reproducible
    assert [u.tolist() for _, u in order.epoch(0)] != [u.tolist() for _, u in order.epoch(1)]  # reshuffled


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("curriculum", [False, True])
def test_per_token_arrays_are_laid_out_like_the_tokens(packing, curriculum):
    """The base's cached top-k rides with its tokens: a side array holding each token's own id (and its id + 1)
    comes back equal to input_ids in every slot of every batch, packed or padded, phased or not."""
    lengths = np.random.default_rng(4).integers(3, 40, 45)
    store = _store(lengths)
    side = np.stack([store.ids, store.ids + 1], axis=1).astype(np.int32)  # [T, 2]
    phases = curriculum_phases(lengths.astype(float), 3) if curriculum else None
    order = BatchOrder(store, micro_batch_size=3, seed=1, pad_id=0, packing=packing, max_seq_len=64, phases=phases,
                       per_token={"side": side})
    for unit in order.epoch(0):
        batch = order.batch(unit)
        ids, got = batch["input_ids"], batch["side"]
        assert got.shape == (*ids.shape, 2)
        real = torch.arange(ids.shape[1])[None, :] < batch.get("lengths", batch.get("row_lengths"))[:, None]
        assert torch.equal(got[..., 0][real], ids[real].int()) and torch.equal(got[..., 1][real], ids[real].int() + 1)
        assert not got[~real].any()  # zeros on padding
