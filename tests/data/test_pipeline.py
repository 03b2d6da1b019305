"""build_dataset end to end: truncation, mixtures, eval splits, the token store, real data."""

import json
from pathlib import Path

import numpy as np
import pytest

from fastsft.data import (ByteTokenizer, DatasetSpec, TokenStore, build_dataset, load_tokenizer,
                          mixture_indices)
from fastsft.data.pipeline import replay_indices

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LLAMA2 = SHARED / "tokenizers" / "llama2"
TOK = ByteTokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def qa_records(tag, n):
    return [{"prompt": f"{tag} question {k}?", "completion": f"{tag} answer {k}"} for k in range(n)]


def record_texts(store):
    return [TOK.decode(ids) for ids, _ in store]


# ------------------------------------------------------------------------------------------------
# TokenStore


def make_store():
    recs = [([1, 2, 3], [-100, 2, 3]), ([4], [-100]), ([5, 6], [5, 6]), ([], [])]
    return TokenStore.from_records(recs, source=[0, 1, 1, 0], names=["a", "b"])


def test_store_basics():
    s = make_store()
    assert len(s) == 4
    assert s.ids.dtype == np.int32 and s.labels.dtype == np.int32
    assert s.offsets.dtype == np.int64 and s.source.dtype == np.int16
    assert s.offsets.tolist() == [0, 3, 4, 6, 6]
    assert s.lengths.tolist() == [3, 1, 2, 0]
    assert s.num_tokens == 6 and s.num_trained_tokens == 4
    assert s.trained_per_record().tolist() == [2, 0, 2, 0]
    ids, labels = s[2]
    assert ids.tolist() == [5, 6] and labels.tolist() == [5, 6]
    assert np.shares_memory(ids, s.ids)  # views, not copies
    assert s[-4][0].tolist() == [1, 2, 3]
    with pytest.raises(IndexError):
        s[4]


def test_store_select_and_concat():
    s = make_store()
    sel = s.select([2, 0, 2])
    assert [r.tolist() for r, _ in sel] == [[5, 6], [1, 2, 3], [5, 6]]
    assert sel.source.tolist() == [1, 0, 1] and sel.names == ["a", "b"]
    assert len(s.select([])) == 0
    other = TokenStore.from_records([([9], [9])], source=0, names=["b"])
    cat = TokenStore.concat([s, other])
    assert len(cat) == 5 and cat[4][0].tolist() == [9]
    assert cat.names == ["a", "b"] and cat.source.tolist() == [0, 1, 1, 0, 1]  # "b" remapped to 1


def test_store_save_load_roundtrip(tmp_path):
    s = make_store()
    path = s.save(tmp_path / "cache" / "train.npz")
    assert path.exists()
    again = TokenStore.load(path)
    assert again == s and again.names == ["a", "b"]
    assert TokenStore.load(s.save(tmp_path / "noext")) == s  # .npz appended
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) >= {"ids", "labels", "offsets", "source"}


def test_built_store_roundtrip(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", qa_records("x", 20))
    b = build_dataset([p], TOK, max_seq_len=64, eval_fraction=0.2)
    for store in (b.train, b.eval):
        assert TokenStore.load(store.save(tmp_path / "s.npz")) == store


# ------------------------------------------------------------------------------------------------
# Truncation


def test_truncation_keeps_start_and_drops_untrainable(tmp_path):
    recs = [{"prompt": "p" * 10, "completion": "c" * 10},   # 1 + 10 + 10 + 1 = 22 tokens
            {"prompt": "p" * 40, "completion": "c" * 5},    # response starts after 41 tokens: dropped
            {"prompt": "p", "completion": "c"}]             # 4 tokens: untouched
    p = write_jsonl(tmp_path / "t.jsonl", recs)
    b = build_dataset([p], TOK, max_seq_len=16)
    rep = b.report["datasets"][0]
    assert (rep["records_read"], rep["records"], rep["dropped_truncated"], rep["truncated"]) == (3, 2, 1, 1)
    lengths = sorted(b.train.lengths.tolist())
    assert lengths == [4, 16]
    long = next(r for r in b.train if len(r[0]) == 16)
    assert TOK.decode(long[0]) == "p" * 10 + "c" * 5  # the start is kept
    assert (long[1] != -100).sum() == 5  # no EOS: it was cut
    with pytest.raises(ValueError, match="max_seq_len"):
        build_dataset([write_jsonl(tmp_path / "u.jsonl", recs[1:2])], TOK, max_seq_len=16)


# ------------------------------------------------------------------------------------------------
# Mixtures


def test_mixture_indices():
    rng = np.random.default_rng(0)
    assert mixture_indices(10, 1.0, rng).tolist() == list(range(10))
    half = mixture_indices(10, 0.5, rng)
    assert len(half) == 5 and len(set(half.tolist())) == 5  # without replacement
    two = mixture_indices(10, 2.0, rng)
    assert np.bincount(two, minlength=10).tolist() == [2] * 10  # whole copies
    x = mixture_indices(10, 2.34, rng)
    counts = np.bincount(x, minlength=10)
    assert len(x) == 23 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 3
    assert len(mixture_indices(10, 0.0, rng)) == 0
    assert len(mixture_indices(3, 0.5, rng)) == 2  # round half up: 1.5 -> 2


def test_mixture_proportions(tmp_path):
    specs = [DatasetSpec(write_jsonl(tmp_path / "a.jsonl", qa_records("a", 40)), weight=1.0),
             DatasetSpec(write_jsonl(tmp_path / "b.jsonl", qa_records("b", 40)), weight=0.5),
             DatasetSpec(write_jsonl(tmp_path / "c.jsonl", qa_records("c", 40)), weight=2.0)]
    b = build_dataset(specs, TOK, max_seq_len=64, seed=1)
    names = [str(s.path) for s in specs]
    assert len(b.train) == 40 + 20 + 80
    assert np.bincount(b.train.source).tolist() == [40, 20, 80]
    texts = record_texts(b.train)
    assert sum(t.startswith("a ") for t in texts) == 40
    assert len({t for t in texts if t.startswith("b ")}) == 20  # subsample: distinct records
    c = [t for t in texts if t.startswith("c ")]
    assert len(c) == 80 and len(set(c)) == 40  # each record exactly twice
    mix = b.report["mixture"]
    assert mix["records"] == pytest.approx(dict(zip(names, [40 / 140, 20 / 140, 80 / 140])))
    trained = [int(b.train.trained_per_record()[b.train.source == i].sum()) for i in range(3)]
    assert mix["trained_tokens"] == pytest.approx(dict(zip(names, np.array(trained) / sum(trained))))
    assert [d["train_records"] for d in b.report["datasets"]] == [40, 20, 80]
    # shuffled, deterministic per seed
    assert b.train.source.tolist() != sorted(b.train.source.tolist())
    again = build_dataset(specs, TOK, max_seq_len=64, seed=1)
    assert again.train == b.train
    other = build_dataset(specs, TOK, max_seq_len=64, seed=2)
    assert other.train != b.train


# ------------------------------------------------------------------------------------------------
# Replay (pretraining-style text against forgetting)


def test_replay_indices_reach_the_closest_total():
    rng = np.random.default_rng(0)
    tokens = np.array([10, 20, 30, 40])
    assert replay_indices(tokens, 0, rng).tolist() == []
    picked = replay_indices(tokens, 100, rng)
    assert sorted(picked.tolist()) == [0, 1, 2, 3]  # exactly everything once
    twice_and_more = replay_indices(tokens, 250, rng)
    counts = np.bincount(twice_and_more, minlength=4)
    assert counts.min() >= 2 and abs(int(tokens[twice_and_more].sum()) - 250) <= 20  # the closest cut of the rest
    for target in (5, 14, 36, 77):  # a prefix of one seeded order, whichever end is closer
        got = int(tokens[replay_indices(tokens, target, np.random.default_rng(3))].sum())
        order = tokens[np.random.default_rng(3).permutation(4)]
        sums = np.concatenate([[0], np.cumsum(order)])
        assert got == sums[np.argmin(np.abs(sums - target))], target


@pytest.mark.parametrize("share", [0.1, 0.3, 0.6])
def test_replay_makes_its_share_of_the_trained_tokens(tmp_path, share):
    prose = [{"text": f"Plain sentence number {k} about rivers, hills and the weather today."} for k in range(60)]
    b = build_dataset([DatasetSpec(write_jsonl(tmp_path / "a.jsonl", qa_records("a", 80)))], TOK, max_seq_len=64,
                      seed=1, eval_fraction=0.1, replay=DatasetSpec(records=prose, name="prose", format="text"),
                      replay_share=share)
    rep = b.report["replay"]
    replay_source = b.train.names.index("replay:prose")
    trained = b.train.trained_per_record()
    replayed = int(trained[b.train.source == replay_source].sum())
    assert rep["trained_tokens"] == replayed and rep["realised_share"] == pytest.approx(replayed / trained.sum())
    per_record = len(TOK.encode(prose[0]["text"])[0])  # every replay token is trained: about this many a record
    assert abs(rep["realised_share"] - share) * trained.sum() <= per_record  # within one record of the target
    assert b.report["mixture"]["trained_tokens"]["replay:prose"] == pytest.approx(rep["realised_share"])
    assert all(not TOK.decode(ids).startswith("Plain") for ids, _ in b.eval)  # the meter-free eval: no replay
    masks = [labels for ids, labels in b.train if TOK.decode(ids).startswith("Plain")]
    assert masks and all((np.asarray(lab)[1:] != -100).all() for lab in masks)  # the loss on all its tokens
    # (but the first, which nothing predicts)
    with pytest.raises(ValueError, match="replay_share"):
        build_dataset([DatasetSpec(write_jsonl(tmp_path / "b.jsonl", qa_records("b", 5)))], TOK, max_seq_len=64,
                      replay=DatasetSpec(records=prose, name="prose", format="text"), replay_share=1.0)


def test_score_field_is_read_per_record_and_kept_through_splits_replay_and_files(tmp_path):
    """data.curriculum field:NAME: each record's number (nested paths, numeric strings) rides with its
    tokens through the eval split, the mixture, the shuffle and save/load; replay records have none."""
    recs = [{"prompt": f"q{k}?", "completion": f"a{k}", "meta": {"level": k if k % 2 else str(k)}}
            for k in range(30)]
    prose = [{"text": f"Plain sentence {k} about the weather."} for k in range(20)]
    b = build_dataset([DatasetSpec(write_jsonl(tmp_path / "a.jsonl", recs))], TOK, max_seq_len=64, seed=2,
                      eval_fraction=0.2, replay=DatasetSpec(records=prose, name="prose", format="text"),
                      replay_share=0.2, score_field="meta.level")
    texts = [TOK.decode(ids) for ids, _ in b.train]
    for text, score in zip(texts, b.train.score):
        if text.startswith("Plain"):
            assert np.isnan(score)
        else:  # the record's own number, after the shuffle
            assert score == float(text.split("q")[1].split("?")[0])
    assert b.eval.score is not None and not np.isnan(b.eval.score).any()
    again = TokenStore.load(b.train.save(tmp_path / "train.npz"))
    assert again == b.train and np.array_equal(again.score, b.train.score, equal_nan=True)
    plain = build_dataset([DatasetSpec(tmp_path / "a.jsonl")], TOK, max_seq_len=64, seed=2)
    assert plain.train.score is None  # not asked for: not stored


def test_a_missing_or_non_numeric_score_names_the_record(tmp_path):
    from helpers import data_error

    recs = [{"prompt": "q?", "completion": "a", "difficulty": 1}, {"prompt": "q?", "completion": "a"}]
    msg = data_error(write_jsonl(tmp_path / "m.jsonl", recs), score_field="difficulty")
    assert msg.startswith(f"{tmp_path / 'm.jsonl'}:2") and "field 'difficulty' (the curriculum's score) not found" in msg
    recs[1]["difficulty"] = "hard"
    msg = data_error(write_jsonl(tmp_path / "m.jsonl", recs), score_field="difficulty")
    assert "field 'difficulty' (the curriculum's score) must be a number, got 'hard'" in msg
    recs[1]["difficulty"] = True
    assert "must be a number" in data_error(write_jsonl(tmp_path / "m.jsonl", recs), score_field="difficulty")
    b = build_dataset([DatasetSpec(tmp_path / "m.jsonl")], TOK, max_seq_len=64, skip_bad_records=True,
                      score_field="difficulty")
    assert len(b.train) == 1 and b.report["datasets"][0]["bad_skipped"] == 1


# ------------------------------------------------------------------------------------------------
# Eval split


def test_eval_fraction_is_disjoint_and_per_dataset(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_records("a", 50))
    c = write_jsonl(tmp_path / "c.jsonl", qa_records("c", 30))
    b = build_dataset([DatasetSpec(a), DatasetSpec(c, weight=2.0)], TOK, max_seq_len=64,
                      eval_fraction=0.1, seed=3)
    train, ev = set(record_texts(b.train)), record_texts(b.eval)
    assert len(ev) == 5 + 3 and len(set(ev)) == 8
    assert not train & set(ev)
    assert len(train) == 45 + 27 and len(b.train) == 45 + 2 * 27
    assert [d["eval_records"] for d in b.report["datasets"]] == [5, 3]
    assert b.report["eval"]["records"] == 8
    # seeded: same split again, different split with another seed
    assert record_texts(build_dataset([a, c], TOK, max_seq_len=64, eval_fraction=0.1, seed=3).eval) == ev
    assert record_texts(build_dataset([a, c], TOK, max_seq_len=64, eval_fraction=0.1, seed=4).eval) != ev


def test_eval_specs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_records("a", 10))
    e = write_jsonl(tmp_path / "e.jsonl", qa_records("e", 4))
    b = build_dataset([a], TOK, max_seq_len=64, eval_specs=[e])
    assert len(b.train) == 10 and len(b.eval) == 4
    assert b.report["eval_datasets"][0]["records"] == 4
    assert build_dataset([a], TOK, max_seq_len=64).eval is None
    with pytest.raises(ValueError, match="either"):
        build_dataset([a], TOK, max_seq_len=64, eval_specs=[e], eval_fraction=0.1)


def test_duplicate_names_are_disambiguated(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_records("a", 4))
    b = build_dataset([a, a], TOK, max_seq_len=64)
    assert b.train.names == [str(a), f"{a}#2"]


def test_report_counts(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "p", "completion": "c"}\nnot json\n{"prompt": "p", "completion": "cc"}\n')
    rep = build_dataset([p], TOK, max_seq_len=64, skip_bad_records=True).report
    d = rep["datasets"][0]
    assert (d["records_read"], d["bad_skipped"], d["records"]) == (3, 1, 2)
    assert d["trained_tokens"] == 1 + 1 + 2 + 1 and rep["train"]["trained_tokens"] == 5
    assert "r.jsonl:2: invalid JSON" in d["bad_examples"][0]
    json.dumps(rep)  # the report is plain JSON


# ------------------------------------------------------------------------------------------------
# Real data with the Llama-2 tokenizer


@pytest.fixture(scope="module")
def llama():
    if not (LLAMA2 / "tokenizer.json").exists():
        pytest.skip(f"{LLAMA2} not present")
    return load_tokenizer(LLAMA2)


def test_gsm8k_with_llama2(llama, tmp_path):
    src = SHARED / "data" / "gsm8k" / "train.jsonl"
    if not src.exists():
        pytest.skip(f"{src} not present")
    with open(src, encoding="utf-8") as f:
        head = [next(f) for _ in range(200)]
    p = tmp_path / "gsm8k_head.jsonl"
    p.write_text("".join(head), encoding="utf-8")
    b = build_dataset([DatasetSpec(p, fields={"prompt": "question", "completion": "answer"})], llama,
                      max_seq_len=1024)
    rep = b.report["datasets"][0]
    assert (rep["records"], rep["bad_skipped"], rep["dropped_truncated"]) == (200, 0, 0)
    assert rep["format"] == "prompt_completion"
    answers = {json.loads(line)["answer"] for line in head}
    for ids, labels in b.train:
        assert ids[0] == llama.bos_id and labels[0] == -100
        trained = ids[labels != -100]
        assert len(trained) > 0 and trained[-1] == llama.eos_id and ids[-1] == llama.eos_id
        # the trained tokens are exactly the answer, and it is the last part of the record
        assert llama.decode(trained) in answers
        first = int(np.argmax(labels != -100))
        assert (labels[first:] != -100).all()


def test_codealpaca_with_llama2(llama, tmp_path):
    src = SHARED / "data" / "codealpaca" / "code_alpaca_2k.json"
    if not src.exists():
        pytest.skip(f"{src} not present")
    recs = json.loads(src.read_text(encoding="utf-8"))[:100]
    p = tmp_path / "ca.json"
    p.write_text(json.dumps(recs), encoding="utf-8")
    b = build_dataset([p], llama, max_seq_len=2048, eval_fraction=0.1)
    assert b.report["datasets"][0]["format"] == "alpaca"
    assert len(b.train) + len(b.eval) == 100
    for ids, labels in b.train:
        assert ids[-1] == llama.eos_id and labels[-1] == llama.eos_id


def test_a_worker_pool_encodes_exactly_what_one_process_does(tmp_path, monkeypatch):
    """Chunks of 7 records through 2 forked workers: the same stores, scores and report as one process; the
    first bad record in file order stops both with the same line; skipped ones are counted alike."""
    from fastsft.data import pipeline

    from helpers import data_error

    monkeypatch.setattr(pipeline, "_CHUNK_RECORDS", 7)
    recs = [{"prompt": f"question {k} " * (k % 5 + 1), "completion": f"answer {k}", "level": k % 3}
            for k in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    one, two = (build_dataset([DatasetSpec(path)], TOK, max_seq_len=24, seed=1, eval_fraction=0.1,
                              score_field="level", workers=w) for w in (1, 2))
    assert one.train == two.train and one.eval == two.eval and one.report == two.report
    assert one.report["datasets"][0]["truncated"] > 0
    recs[30] = {"prompt": "no answer here"}
    recs[50] = {"oops": 1}
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    msgs = {w: data_error(path, workers=w) for w in (1, 2)}
    assert msgs[1] == msgs[2] and msgs[1].startswith(f"{path}:31: ")
    skipped = [build_dataset([DatasetSpec(path)], TOK, max_seq_len=24, skip_bad_records=True, workers=w)
               for w in (1, 2)]
    assert skipped[0].report == skipped[1].report and skipped[0].report["datasets"][0]["bad_skipped"] == 2
