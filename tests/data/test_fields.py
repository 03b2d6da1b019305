"""Field mappings that reach inside records (paths, [*] one example per list element) and the hints
format detection gives: only fields that look like prompts/responses, and "no responses" in words."""

import pytest

from fastsft.data import ByteTokenizer, DataError, DatasetSpec, build_dataset, normalize
from fastsft.data.formats import check_fields, record_elements

from helpers import data_error as error
from helpers import stored, write_jsonl

TOK = ByteTokenizer()
SELF_INSTRUCT_FIELDS = {"instruction": "instruction", "input": "instances[*].input", "output": "instances[*].output"}


def seed_task(i, instances):
    return {"id": f"seed_task_{i}", "name": f"task_name_{i}", "instruction": f"Do task number {i} carefully.",
            "instances": instances, "is_classification": i % 2 == 0}


SEEDS = [seed_task(0, [{"input": "", "output": "First answer."}]),
         seed_task(1, [{"input": "Input one.", "output": "Answer one."},
                       {"input": "Input two.", "output": "Answer two."}]),
         seed_task(2, [{"input": "", "output": "Third answer, the only one."}])]
MT_BENCH = [{"question_id": 81 + k, "category": "writing",
             "turns": [f"Compose an engaging travel blog post about island {k}.", "Rewrite your previous response."]}
            for k in range(4)]




# ------------------------------------------------------------------------------------------------
# Paths and [*]


def test_self_instruct_seed_tasks_map_exactly(tmp_path):
    p = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS)
    got, rep = stored(DatasetSpec(p, fields=SELF_INSTRUCT_FIELDS))
    expected = [{"instruction": s["instruction"], "input": inst["input"], "output": inst["output"]}
                for s in SEEDS for inst in s["instances"]]
    want, _ = stored(DatasetSpec(records=expected, name="flat"))
    assert got == want  # one example per instance, in order, instruction from the parent
    assert (rep["format"], rep["records_read"], rep["source_records"]) == ("alpaca", 4, 3)


def test_indexed_and_dotted_paths_are_the_same(tmp_path):
    p = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS)
    a = stored(DatasetSpec(p, fields={"instruction": "instruction", "output": "instances[0].output"}))[0]
    b = stored(DatasetSpec(p, fields={"instruction": "instruction", "output": "instances.0.output"}))[0]
    last = stored(DatasetSpec(p, fields={"instruction": "instruction", "output": "instances[-1].output"}))[0]
    assert a == b and len(a) == 3 and a != last
    assert normalize(SEEDS[1], "alpaca", {"instruction": "instruction", "output": "instances.1.output"})["output"] == (
        "Answer two.")


def test_nested_objects_quoted_keys_and_exact_dotted_keys():
    rec = {"meta": {"q": "Why?"}, "a.b": "Because.", "x": {"odd.key": "Indeed."}}
    assert normalize(rec, "prompt_completion", {"prompt": "meta.q", "completion": "a.b"}) == {
        "prompt": "Why?", "completion": "Because."}
    assert normalize(rec, "prompt_completion", {"prompt": "meta.q", "completion": 'x["odd.key"]'})["completion"] == (
        "Indeed.")


def test_a_missing_path_is_field_not_found_naming_the_path_and_record(tmp_path):
    p = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS)
    msg = error(DatasetSpec(p, fields={"instruction": "instruction", "output": "instances[0].outptu"}))
    assert msg == (f"{p}:1: field 'instances[0].outptu' not found (in none of the 3 records looked at): "
                   f"'instances[0]' has no key 'outptu' (keys: 'input', 'output')")
    assert "cannot detect" not in msg
    # with the format given, every record is checked: the one without a second instance is named
    msg = error(DatasetSpec(p, format="alpaca", fields={"instruction": "instruction", "output": "instances.1.output"}))
    assert msg == f"{p}:1: field 'instances.1.output' not found: 'instances' has 1 element, no [1]"
    msg = error(DatasetSpec(p, format="alpaca", fields={"instruction": "task.text", "output": "instances.0.output"}))
    assert msg.startswith(f"{p}:1: field 'task.text' not found: the record has no key 'task' (keys: 'id', 'name'")


def test_exploded_elements_are_validated_one_by_one(tmp_path):
    recs = SEEDS + [seed_task(3, [{"input": "", "output": "ok"}, {"input": "", "output": " "}]),
                    seed_task(4, []), seed_task(5, [{"input": "only input"}]), dict(SEEDS[0], instances="none")]
    p = write_jsonl(tmp_path / "seed_tasks.jsonl", recs)
    assert error(DatasetSpec(p, fields=SELF_INSTRUCT_FIELDS)) == f"{p}:4: field 'instances[1].output' is empty"
    b = build_dataset([DatasetSpec(p, fields=SELF_INSTRUCT_FIELDS)], TOK, max_seq_len=512, skip_bad_records=True)
    rep = b.report["datasets"][0]
    assert rep["bad_skipped"] == 4 and len(b.train) == 5  # 4 seeds' instances + the good one of task 3
    assert rep["bad_examples"] == [
        f"{p}:4: field 'instances[1].output' is empty",
        f"{p}:5: field 'instances' is an empty list (no example to take from it)",
        f"{p}:6: field 'instances[0].output' not found: 'instances[0]' has no key 'output' (keys: 'input')",
        f"{p}:7: field 'instances' must be a list (the field mapping takes one example per element), got a string",
    ]


def test_exploded_conversations_name_the_element(tmp_path):
    rec = {"dialogs": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                       [{"role": "user", "content": "only a question"}]]}
    p = write_jsonl(tmp_path / "d.jsonl", [rec])
    msg = error(DatasetSpec(p, fields={"messages": "dialogs[*]"}))
    assert msg == f"{p}:1: dialogs[1]: conversation has no assistant turn (nothing to train on)"
    got, rep = stored(DatasetSpec(p, fields={"messages": "dialogs[*]"}), skip_bad_records=True)
    assert len(got) == 1 and rep["format"] == "messages"


@pytest.mark.parametrize("fields, reason", [
    ({"output": "instances[0.output"}, "'[' is never closed"),
    ({"output": "instances[x].output"}, "must be an index"),
    ({"output": "a..b"}, "empty key"),
    ({"output": "a[*].b[*].c"}, "only one [*] per path"),
    ({"instruction": "a[*].q", "output": "b[*].r"}, "explodes both 'a[*]' and 'b[*]'"),
])
def test_bad_paths_are_spec_errors(fields, reason):
    with pytest.raises(DataError, match=r"^x\.jsonl: .*" + reason.replace("[", r"\[").replace("]", r"\]")
                       .replace("*", r"\*").replace(".", r"\.")):
        check_fields(fields, where="x.jsonl")


def test_record_elements_and_unexploded_normalize():
    assert record_elements(SEEDS[1], SELF_INSTRUCT_FIELDS) == [0, 1]
    assert record_elements(SEEDS[1], {"instruction": "instruction"}) == [None]
    assert normalize(SEEDS[1], "alpaca", SELF_INSTRUCT_FIELDS, element=1) == {
        "instruction": SEEDS[1]["instruction"], "input": "Input two.", "output": "Answer two."}
    with pytest.raises(DataError, match="one example per element of 'instances'"):
        normalize(SEEDS[1], "alpaca", SELF_INSTRUCT_FIELDS)


def test_self_instruct_from_parquet_with_the_same_mapping(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(SEEDS), tmp_path / "seeds.parquet")
    got = stored(DatasetSpec(tmp_path / "seeds.parquet", fields=SELF_INSTRUCT_FIELDS))[0]
    assert got == stored(DatasetSpec(write_jsonl(tmp_path / "s.jsonl", SEEDS), fields=SELF_INSTRUCT_FIELDS))[0]


# ------------------------------------------------------------------------------------------------
# Detection hints


def _suggested(msg: str) -> str:
    return msg.split("--fields ", 1)[1].split(" ", 1)[0]


def test_self_instruct_hint_suggests_the_nested_mapping_never_ids(tmp_path):
    p = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS)
    msg = error(p)
    assert "cannot detect the data format" in msg
    assert _suggested(msg) == "instruction=instruction,input=instances[*].input,output=instances[*].output"
    assert "=id" not in msg and "=name" not in msg and "=is_classification" not in msg
    got = stored(DatasetSpec(p, fields=dict(kv.split("=") for kv in _suggested(msg).split(","))))[0]
    assert len(got) == 4  # following the hint trains on the instances


def test_mt_bench_questions_say_there_are_no_answers(tmp_path):
    p = write_jsonl(tmp_path / "question.jsonl", MT_BENCH)
    msg = error(p)
    assert msg.startswith(f"{p}: cannot detect the data format: records have keys ['question_id', 'category', 'turns']")
    assert "no answers or responses to train on" in msg and "'turns'" in msg
    assert "--fields" not in msg  # nothing to map: no suggestion of ids or categories as responses


@pytest.mark.parametrize("records, suggestion", [
    ([{"question": "What is 2+2?", "answer": "4"}], "instruction=question,output=answer"),
    ([{"q": "a", "a": "b"}], "instruction=q,output=a"),
    # ids, names, categories and slug-like labels are never suggested; prose fields are
    ([{"uid": "row_17", "category": "math", "name": "task_3", "body": "Explain why the sky is blue in two lines.",
       "reply_text": "Rayleigh scattering favours short wavelengths."}], "instruction=body,output=reply_text"),
    ([{"task_id": "t1", "prompt_text": "Write a haiku about rain.", "notes": "Soft rain on the roof, puddles hold "
       "the grey sky close."}], "instruction=prompt_text,output=notes"),
    ([{"conversation_id": "c1", "turns": ["First question here?", "Second one?"], "reference": "The answer is x."}],
     "instruction=turns[0],output=reference"),
    ([{"question": "Where is Paris?", "answers": ["In France."]}], "instruction=question,output=answers[0]"),
])
def test_hints_use_fields_that_look_like_the_role(tmp_path, records, suggestion):
    p = write_jsonl(tmp_path / "f.jsonl", records * 3)
    assert _suggested(error(p)) == suggestion


def test_prompt_without_response_in_a_flat_file(tmp_path):
    p = write_jsonl(tmp_path / "prompts.jsonl", [{"id": k, "prompt": f"Tell me a fact about the number {k}.",
                                                  "source": "synthetic_v2"} for k in range(5)])
    msg = error(p)
    assert "no answers or responses to train on: 'prompt' holds the prompts" in msg
