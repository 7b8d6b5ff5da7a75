"""Benchmark loaders on the shipped data and on synthetic fixtures in the real schemas."""

import json
from pathlib import Path

import pytest

from quantlrm.errors import QuantLRMError
from quantlrm.eval import Sample, Task, expand_task_names, grade, load_task
from quantlrm.eval.tasks import read_records

FIX = Path(__file__).parent / "fixtures" / "eval"


def test_shipped_temporal_has_250_four_option_questions():
    t = load_task("temporal")
    assert len(t) == 250 and t.grader == "temporal"
    assert {s.reference for s in t.samples} == {"(A)", "(B)", "(C)", "(D)"}
    assert all("Options:\n(A)" in s.prompt and "(D)" in s.prompt for s in t.samples)
    assert len(load_task("temporal", limit=7)) == 7


def test_shipped_folio_validation_and_paper_validation_subset():
    t = load_task("folio")
    assert len(t) == 204 and t.grader == "folio"
    assert {s.reference for s in t.samples} == {"True", "False", "Uncertain"}
    s = t.samples[0]
    assert s.prompt.startswith("Based on the following premises")
    assert "Conclusion: Bonnie performs in school talent shows often." in s.prompt
    val = load_task("val_folio")
    assert len(val) == 100 and len({x.id for x in val.samples}) == 100
    assert [x.id for x in load_task("val_folio").samples] == [
        x.id for x in val.samples
    ]  # fixed seed
    assert [x.id for x in load_task("val_folio", seed=1).samples] != [x.id for x in val.samples]
    assert {x.reference for x in val.samples} <= {"True", "False", "Unknown"}  # train-split labels


def test_aime_years_from_ids_and_year_column():
    rows = [json.loads(line) for line in (FIX / "aime.jsonl").read_text().splitlines()]
    aime = load_task("aime", FIX / "aime.jsonl")
    assert len(aime) == 8  # 2 per year, 2022-2025
    assert {s.meta["year"] for s in aime.samples} == {2022, 2023, 2024, 2025}
    first = next(r for r in rows if r["id"] == aime.samples[0].id)
    assert (
        aime.samples[0].prompt == first["problem"] and aime.samples[0].reference == first["answer"]
    )
    assert grade("aime", f"\\boxed{{{int(first['answer'])}}}", aime.samples[0].reference)
    val = load_task("val_aime", FIX / "aime.jsonl")
    assert [s.id for s in val.samples] == ["2021-I-1", "2021-II-1"]
    kaggle = load_task("aime", FIX / "aime_kaggle.csv")
    assert [s.meta["year"] for s in kaggle.samples] == [2022, 2024]
    assert kaggle.samples[1].reference == "8"
    assert len(load_task("val_aime", str(FIX / "aime_kaggle.csv"))) == 2


def test_gpqa_options_are_shuffled_reproducibly_and_lettered(tmp_path):
    t = load_task("gpqa", FIX / "gpqa_diamond.csv")
    assert len(t) == 8 and t.grader == "gpqa"
    letters = []
    for s in t.samples:
        letter = s.reference.strip("()")
        letters.append(letter)
        # the correct answer text sits at the reference letter
        right = next(ln for ln in s.prompt.splitlines() if ln.startswith(f"({letter}) "))
        assert right.endswith("Xa" + s.id[-1])
        assert [ln[:3] for ln in s.prompt.splitlines()[-4:]] == ["(A)", "(B)", "(C)", "(D)"]
    assert len(set(letters)) >= 2  # actually shuffled (8 questions; all-same has prob 4^-7)
    # same letters when the file order changes or another seed is used
    lines = (FIX / "gpqa_diamond.csv").read_text().splitlines(keepends=True)
    rev = tmp_path / "rev.csv"
    rev.write_text(lines[0] + "".join(reversed(lines[1:])))
    by_id = {s.id: s.reference for s in load_task("gpqa", rev).samples}
    assert by_id == {s.id: s.reference for s in t.samples}
    other = {s.id: s.reference for s in load_task("gpqa", FIX / "gpqa_diamond.csv", seed=5).samples}
    assert other != by_id


def test_folio_hub_schema_and_json_containers(tmp_path):
    t = load_task("folio", FIX / "folio_hub.jsonl")
    assert [s.reference for s in t.samples] == ["True", "False", "Uncertain"]
    assert "All blorps are zings.\nTim is a blorp 0." in t.samples[0].prompt
    p = tmp_path / "temporal.json"
    p.write_text(
        json.dumps({"examples": [{"input": "Q?\nOptions:\n(A) x\n(B) y", "target": "(B)"}]})
    )
    assert load_task("temporal", p).samples[0].reference == "(B)"
    p.write_text(json.dumps([{"input": "Q", "target": "(A)"}]))
    assert len(read_records(p)) == 1


def test_missing_data_names_where_to_get_it_and_the_flag(tmp_path):
    with pytest.raises(QuantLRMError, match=r"--aime FILE.*MAA copyright"):
        load_task("aime")
    with pytest.raises(QuantLRMError, match=r"--aime2021"):
        load_task("val_aime")
    with pytest.raises(QuantLRMError, match=r"--gpqa FILE.*gpqa_diamond.csv"):
        load_task("gpqa")
    with pytest.raises(QuantLRMError, match=r"does not exist.*--gpqa"):
        load_task("gpqa", tmp_path / "nope.csv")
    with pytest.raises(QuantLRMError, match=r"not installed.*--gpqa"):
        load_task("gpqa", "Idavidrein/gpqa:gpqa_diamond@train")  # no `datasets` here
    with pytest.raises(QuantLRMError, match=r"Unknown task 'mmlu'.*aime, folio, temporal, gpqa"):
        load_task("mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(QuantLRMError, match="answer"):
        load_task("aime", bad)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(QuantLRMError, match="pyarrow or pandas"):
        load_task("aime", tmp_path / "x.parquet")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(QuantLRMError, match="unknown extension"):
        load_task("aime", tmp_path / "x.txt")
    only2020 = tmp_path / "a.jsonl"
    only2020.write_text('{"id": "2020-I-1", "problem": "p", "answer": "1"}\n')
    with pytest.raises(QuantLRMError, match="no problems of years 2022-2025"):
        load_task("aime", only2020)


def test_task_names_groups_and_in_memory_tasks():
    assert expand_task_names("paper,ppl") == ["aime", "folio", "temporal", "gpqa", "ppl"]
    assert expand_task_names(["validation", "folio"]) == ["val_aime", "val_folio", "folio"]
    t = Task.from_pairs("add", [("1+1=", "2"), ("2+2=", "4")], grader="number")
    assert [s.id for s in t.samples] == ["0", "1"] and len(t.head(1)) == 1
    with pytest.raises(QuantLRMError, match="unknown grader"):
        Task("t", [], grader="bleu")
    with pytest.raises(QuantLRMError, match="duplicate"):
        Task("t", [Sample("a", "p", "1"), Sample("a", "q", "2")], grader="aime")
    with pytest.raises(QuantLRMError, match="not an integer"):
        Task.from_pairs("t", [("p", "x")], grader="aime")


@pytest.mark.parametrize("name", ["temporal", "folio", "val_folio"])
def test_every_shipped_reference_is_gradable(name):
    t = load_task(name)
    for s in t.samples:
        ref = s.reference.strip("()")
        assert grade(t.grader, f"<think>hmm</think>\nAnswer: {ref}", s.reference)
        wrong = next(
            x for x in (["A", "B"] if t.grader == "temporal" else ["True", "False"]) if x != ref
        )
        assert not grade(t.grader, f"<think>{ref}</think>\nAnswer: {wrong}", s.reference)
