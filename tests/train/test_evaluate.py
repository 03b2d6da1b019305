"""The final-answer metric (``eval.answer_pattern``): answers found by a regex in the expected and the
generated response, compared as numbers when both are."""

import pytest

from fastsft import config as cfgmod
from fastsft.data import DatasetSpec, build_dataset, load_tokenizer
from fastsft.train import evaluate

GSM8K = r"#### (-?[0-9.,]+)"


@pytest.mark.parametrize("text, answer", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234.", "1234"), ("#### -5.50", "-5.50"),
    ("no answer here", None), ("#### 2\n#### 3", "2"),
])
def test_extract_answer(text, answer):
    assert evaluate.extract_answer(GSM8K, text) == answer


def test_whole_match_without_a_group_and_numeric_comparison():
    assert evaluate.extract_answer(r"-?\d+", "the answer is 42 apples") == "42"
    assert evaluate.same_answer("72", "72.0") and evaluate.same_answer("1234", "1234")
    assert not evaluate.same_answer("72", "27") and not evaluate.same_answer("7", None)
    assert evaluate.same_answer("Paris", "Paris") and not evaluate.same_answer("Paris", "paris")


def _store():
    records = [{"prompt": "q1", "completion": "work\n#### 1,000"}, {"prompt": "q2", "completion": "#### 7"},
               {"prompt": "q3", "completion": "none"}, {"prompt": "q4", "completion": "x\n#### 5"}]
    tok = load_tokenizer("byte")
    store = build_dataset([DatasetSpec(records=records, name="t", format="prompt_completion")], tok,
                          max_seq_len=64, eval_fraction=0.0).train
    return tok, store


def test_answer_accuracy_counts_records_with_an_expected_answer(monkeypatch):
    tok, store = _store()
    generated = {"q1": "other work\n#### 1000", "q2": "#### 8", "q3": "none", "q4": "#### 5.0 done"}

    def fake_generate(model, prompts, **kw):
        return [tok.encode(generated[tok.decode(list(p)).strip()[-2:]])[0] + [tok.eos_id] for p in prompts]

    class Model:
        training = False

        def eval(self):
            pass

        def train(self, mode):
            pass

    monkeypatch.setattr(evaluate, "greedy_generate", fake_generate)
    out = evaluate.exact_match(Model(), tok, store, n=4, max_new_tokens=8, batch_size=2, device="cpu",
                               answer_pattern=GSM8K)
    assert out["exact_match"] == 0.25  # only q3's whole response is generated exactly
    assert out["answer_records"] == 3 and out["answer_accuracy"] == pytest.approx(2 / 3)  # q1 and q4
    q1 = [x for x in out["samples"] if x["expected"].startswith("work")]
    assert not q1 or (q1[0]["expected_answer"], q1[0]["generated_answer"]) == ("1000", "1000")
    assert any("expected_answer" in x for x in out["samples"])
    plain = evaluate.exact_match(Model(), tok, store, n=4, max_new_tokens=8, batch_size=2, device="cpu")
    assert "answer_accuracy" not in plain


def test_a_bad_pattern_is_refused_by_name():
    with pytest.raises(cfgmod.ConfigError, match="eval.answer_pattern"):
        cfgmod.load(None, {"eval.answer_pattern": "#### (["})
