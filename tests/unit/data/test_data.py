"""Tests of relbert_ds.data: bundled counts, validation messages, source resolution, hub path."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from relbert_ds.data import (
    BUNDLED_ANALOGY,
    BUNDLED_CLASSIFICATION,
    BUNDLED_RELATION,
    bundled_path,
    load_analogy_dataset,
    load_classification_dataset,
    load_relation_dataset,
)
from relbert_ds.errors import DataError
from tests.assertions import assert_one_line
from tests.fakes import FakeHub

# --------------------------------------------------------------------------- helpers

GOOD_RELATION = {"relation_type": "1a", "positives": [["a", "b"], ["c", "d"]], "negatives": [["e", "f"]]}
GOOD_ANALOGY = {"stem": ["a", "b"], "answer": 1, "choice": [["c", "d"], ["e", "f"], ["g", "h"]], "prefix": "p"}
GOOD_LEXICAL = {"head": "dog", "tail": "animal", "relation": "hyper"}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write records (dicts/lists are JSON-encoded, str/bytes written raw) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    for line in lines:
        if isinstance(line, bytes):
            chunks.append(line)
        elif isinstance(line, str):
            chunks.append(line.encode("utf-8"))
        else:
            chunks.append(json.dumps(line).encode("utf-8"))
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def first_json_line(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.loads(handle.readline())


def assert_line_error(exc: pytest.ExceptionInfo, path: Path, line: int) -> str:
    return assert_one_line(exc, path.name, f"line {line}:", "; fix:")


# --------------------------------------------------------------------------- bundled data


@pytest.mark.parametrize("split, n_rel, n_pos, n_neg", [("train", 79, 632, 632), ("validation", 79, 158, 158)])
def test_bundled_semeval_counts(split: str, n_rel: int, n_pos: int, n_neg: int) -> None:
    data = load_relation_dataset("semeval2012", split)
    assert data.name == "semeval2012" and data.split == split
    assert len(data) == n_rel
    assert sum(len(g.positives) for g in data.relations) == n_pos
    assert sum(len(g.negatives) for g in data.relations) == n_neg
    assert Path(data.source).is_absolute() and Path(data.source).name == f"{split}.jsonl"


@pytest.mark.parametrize("name, split, count", [
    ("sat", "valid", 37), ("sat", "test", 337), ("u2", "valid", 24), ("u2", "test", 228),
    ("u4", "valid", 48), ("google", "valid", 50), ("bats", "valid", 199),
])
def test_bundled_analogy_counts(name: str, split: str, count: int) -> None:
    data = load_analogy_dataset(name, split)
    assert (data.name, data.split, len(data)) == (name, split, count)


@pytest.mark.parametrize("name, counts", [
    ("BLESS", {"train": 18582, "validation": 1327, "test": 6637}),
    ("KHN", {"train": 40256, "validation": 2876, "test": 14377}),
])
def test_bundled_classification_counts(name: str, counts: dict[str, int]) -> None:
    data = load_classification_dataset(name)
    assert data.name == name
    assert {split: len(pairs) for split, pairs in data.splits.items()} == counts


def test_bundled_constants_and_paths() -> None:
    assert BUNDLED_RELATION == ("semeval2012",)
    assert BUNDLED_ANALOGY == ("sat", "u2", "u4", "google", "bats")
    assert BUNDLED_CLASSIFICATION == ("BLESS", "KHN")
    assert bundled_path("classification", "k&h+n").name == "KHN"
    assert bundled_path("analogy", "SAT").is_dir()
    assert (bundled_path("relation", "semeval") / "relations.json").is_file()
    with pytest.raises(DataError, match="; fix:"):
        bundled_path("analogy", "BLESS")
    with pytest.raises(DataError, match="; fix:"):
        bundled_path("embedding", "sat")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_bundled_semeval_parents_match_relations_json(split: str) -> None:
    meta = json.loads((bundled_path("relation", "semeval2012") / "relations.json").read_text("utf-8"))
    expected = {rid: str(entry["parent_id"]) for rid, entry in meta["relations"].items()}
    data = load_relation_dataset("semeval2012", split)
    assert {g.relation_type: g.parent for g in data.relations} == expected
    assert len(expected) == 79


def test_first_records_equal_raw_json() -> None:
    sem = first_json_line(bundled_path("relation", "semeval2012") / "train.jsonl")
    group = load_relation_dataset().relations[0]
    assert group.relation_type == sem["relation_type"]
    assert [list(p) for p in group.positives] == sem["positives"]
    assert [list(p) for p in group.negatives] == sem["negatives"]

    for name, split in [("sat", "test"), ("bats", "valid")]:
        raw = first_json_line(bundled_path("analogy", name) / f"{split}.jsonl")
        q = load_analogy_dataset(name, split).questions[0]
        assert (list(q.stem), [list(c) for c in q.choices], q.answer, q.prefix) == (
            raw["stem"], raw["choice"], raw["answer"], raw["prefix"])

    raw = first_json_line(bundled_path("classification", "BLESS") / "test.jsonl")
    pair = load_classification_dataset("bless", ["test"]).splits["test"][0]
    assert (pair.head, pair.tail, pair.relation) == (raw["head"], raw["tail"], raw["relation"])


# --------------------------------------------------------------------------- bad input


def rel(**changes: Any) -> dict:
    return {**GOOD_RELATION, "relation_type": "9z", **changes}


def ana(**changes: Any) -> dict:
    return {**GOOD_ANALOGY, **changes}


def lex(**changes: Any) -> dict:
    return {**GOOD_LEXICAL, **changes}


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


RELATION_BAD = {
    "invalid_json": ('{"relation_type": "2a",', "not valid JSON"),
    "not_object": ([1, 2], "expected a JSON object"),
    "missing_negatives": (_without(rel(), "negatives"), "missing field 'negatives'"),
    "relation_type_int": (rel(relation_type=5), "must be a string"),
    "relation_type_empty": (rel(relation_type=""), "empty"),
    "positives_not_list": (rel(positives="a:b"), "must be a list"),
    "pair_of_three": (rel(positives=[["a", "b", "c"], ["c", "d"]]), "exactly two strings"),
    "pair_is_string": (rel(negatives=["ab"]), "exactly two strings"),
    "word_not_string": (rel(positives=[["a", 1], ["c", "d"]]), "must be a string"),
    "empty_word": (rel(positives=[["", "b"], ["c", "d"]]), "empty"),
    "whitespace_word": (rel(negatives=[["x", "  \t"]]), "whitespace"),
    "one_distinct_positive": (rel(positives=[["a", "b"], ["a", "b"]]),
                              "relation '9z' has 1 distinct positive pairs; contrastive training needs at least 2"),
    "duplicate_relation": (rel(relation_type="1a"), "already appears at"),
    "parent_bool": (rel(parent=True), "'parent' must be a string or an integer"),
}

ANALOGY_BAD = {
    "invalid_json": ("{stem: 1}", "not valid JSON"),
    "missing_stem": (_without(ana(), "stem"), "missing field 'stem'"),
    "stem_one_word": (ana(stem=["a"]), "exactly two strings"),
    "choice_single": (ana(choice=[["c", "d"]], answer=0), "at least 2"),
    "answer_out_of_range": (ana(choice=[["a", "b"]] * 5, answer=7), "answer index 7 is out of range for 5 choices"),
    "answer_negative": (ana(answer=-1), "out of range"),
    "answer_bool": (ana(answer=True), "'answer' must be an integer"),
    "answer_string": (ana(answer="1"), "'answer' must be an integer"),
    "prefix_int": (ana(prefix=3), "'prefix' must be a string"),
    "choice_word_blank": (ana(choice=[["c", " "], ["e", "f"]]), "whitespace"),
}

LEXICAL_BAD = {
    "invalid_json": ('{"head": "a"', "not valid JSON"),
    "not_object": ('"dog animal hyper"', "expected a JSON object"),
    "missing_tail": (_without(lex(), "tail"), "missing field 'tail'"),
    "relation_int": (lex(relation=5), "must be a string"),
    "head_empty": (lex(head=""), "empty"),
}


@pytest.mark.parametrize("case", sorted(RELATION_BAD))
def test_relation_bad_input(tmp_path: Path, case: str) -> None:
    bad, expected = RELATION_BAD[case]
    path = write_jsonl(tmp_path / "myrel" / "train.jsonl", [GOOD_RELATION, "", bad])
    with pytest.raises(DataError) as exc:
        load_relation_dataset(str(path))
    assert expected in assert_line_error(exc, path, 3)


@pytest.mark.parametrize("case", sorted(ANALOGY_BAD))
def test_analogy_bad_input(tmp_path: Path, case: str) -> None:
    bad, expected = ANALOGY_BAD[case]
    path = write_jsonl(tmp_path / "mybench" / "test.jsonl", [GOOD_ANALOGY, "   ", bad])
    with pytest.raises(DataError) as exc:
        load_analogy_dataset(str(path))
    assert expected in assert_line_error(exc, path, 3)


@pytest.mark.parametrize("case", sorted(LEXICAL_BAD))
def test_classification_bad_input(tmp_path: Path, case: str) -> None:
    bad, expected = LEXICAL_BAD[case]
    folder = tmp_path / "mylex"
    write_jsonl(folder / "train.jsonl", [GOOD_LEXICAL])
    path = write_jsonl(folder / "test.jsonl", [GOOD_LEXICAL, "", bad])
    with pytest.raises(DataError) as exc:
        load_classification_dataset(str(folder))
    assert expected in assert_line_error(exc, path, 3)


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b" / "test.jsonl", [GOOD_ANALOGY, GOOD_ANALOGY, b'{"stem": ["\xff", "b"]}'])
    with pytest.raises(DataError) as exc:
        load_analogy_dataset(str(path))
    assert "UTF-8" in assert_line_error(exc, path, 3)


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "b" / "test.jsonl"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        load_analogy_dataset(str(path))
    assert path.name in str(exc.value) and "no records" in str(exc.value) and "; fix:" in str(exc.value)


def test_unseen_label_in_test(tmp_path: Path) -> None:
    folder = tmp_path / "lex"
    write_jsonl(folder / "train.jsonl", [GOOD_LEXICAL, lex(relation="mero")])
    write_jsonl(folder / "validation.jsonl", [GOOD_LEXICAL])
    path = write_jsonl(folder / "test.jsonl", [GOOD_LEXICAL, lex(relation="antonym")])
    with pytest.raises(DataError) as exc:
        load_classification_dataset(str(folder))
    message = assert_line_error(exc, path, 2)
    assert "'antonym'" in message and "'test'" in message and "train" in message


@pytest.mark.parametrize("present", [["train.jsonl"], ["test.jsonl", "validation.jsonl"]])
def test_classification_folder_needs_train_and_test(tmp_path: Path, present: list[str]) -> None:
    folder = tmp_path / "lex"
    for name in present:
        write_jsonl(folder / name, [GOOD_LEXICAL])
    with pytest.raises(DataError) as exc:
        load_classification_dataset(str(folder))
    message = str(exc.value)
    assert str(folder) in message and "train.jsonl and test.jsonl" in message and "; fix:" in message


# --------------------------------------------------------------------------- accepted input


def test_words_kept_exactly_and_blank_lines_skipped(tmp_path: Path) -> None:
    q = ana(stem=[" Oak", "New  York "], prefix="")
    path = write_jsonl(tmp_path / "b" / "test.jsonl", ["", q, "", _without(ana(), "prefix")])
    data = load_analogy_dataset(str(path))
    assert len(data) == 2
    assert data.questions[0].stem == (" Oak", "New  York ")
    assert data.questions[1].prefix == ""


def test_relation_parents(tmp_path: Path) -> None:
    records = [
        {**GOOD_RELATION, "relation_type": "3b", "parent": 7},  # explicit int field wins
        {**GOOD_RELATION, "relation_type": "3c", "parent": "SIMILAR"},
        {**GOOD_RELATION, "relation_type": "10f"},  # SemEval id pattern
        {**GOOD_RELATION, "relation_type": "capital_of"},  # nothing known
        {**GOOD_RELATION, "relation_type": "x"},  # from relations.json (second run)
    ]
    folder = tmp_path / "rels"
    write_jsonl(folder / "train.jsonl", records)
    parents = [g.parent for g in load_relation_dataset(str(folder)).relations]
    assert parents == ["7", "SIMILAR", "10", None, None]

    (folder / "relations.json").write_text(json.dumps(
        {"relations": {"x": {"parent_id": 4}, "10f": {"parent_id": 2}, "3b": {"parent_id": 1}}}))
    parents = [g.parent for g in load_relation_dataset(str(folder)).relations]
    assert parents == ["7", "SIMILAR", "2", None, "4"]


def test_relation_negatives_may_be_empty_and_duplicates_kept(tmp_path: Path) -> None:
    record = rel(positives=[["a", "b"], ["a", "b"], ["c", "d"]], negatives=[])
    data = load_relation_dataset(str(write_jsonl(tmp_path / "r" / "train.jsonl", [record])))
    assert data.relations[0].positives == (("a", "b"), ("a", "b"), ("c", "d"))
    assert data.relations[0].negatives == ()


# --------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("alias, name", [("K&H+N", "KHN"), ("khn", "KHN"), ("KHN", "KHN"), ("bless", "BLESS")])
def test_classification_aliases(alias: str, name: str) -> None:
    data = load_classification_dataset(alias, ["validation"])
    assert data.name == name and list(data.splits) == ["validation"]


@pytest.mark.parametrize("alias", ["semeval2012", "semeval", "SemEval2012"])
def test_relation_aliases(alias: str) -> None:
    assert load_relation_dataset(alias, "valid").name == "semeval2012"


def test_split_aliases_valid_and_validation() -> None:
    assert len(load_analogy_dataset("sat", "validation")) == 37  # file is valid.jsonl
    assert len(load_relation_dataset("semeval2012", "valid")) == 79  # file is validation.jsonl
    assert set(load_classification_dataset("BLESS", ["valid", "train"]).splits) == {"validation", "train"}


def test_missing_split_lists_present_ones() -> None:
    with pytest.raises(DataError) as exc:
        load_analogy_dataset("google", "test")
    message = str(exc.value)
    assert "no split 'test'" in message and "splits present: valid" in message and "; fix:" in message


def test_folder_and_single_file_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mybench"
    write_jsonl(folder / "valid.jsonl", [GOOD_ANALOGY])
    write_jsonl(folder / "test.jsonl", [GOOD_ANALOGY, GOOD_ANALOGY])

    by_folder = load_analogy_dataset(str(folder), "validation")
    assert (by_folder.name, by_folder.split, len(by_folder)) == ("mybench", "validation", 1)
    assert by_folder.source == str((folder / "valid.jsonl").resolve())

    by_file = load_analogy_dataset(str(folder / "test.jsonl"))
    assert (by_file.name, len(by_file)) == ("mybench", 2)

    # A local path is tried before a bundled name: a folder called "sat" shadows the bundled SAT.
    write_jsonl(tmp_path / "sat" / "test.jsonl", [GOOD_ANALOGY])
    monkeypatch.chdir(tmp_path)
    assert len(load_analogy_dataset("sat")) == 1
    assert len(load_analogy_dataset("mybench")) == 2

    lex_file = write_jsonl(tmp_path / "lex" / "test.jsonl", [GOOD_LEXICAL])
    assert list(load_classification_dataset(str(lex_file)).splits) == ["test"]


@pytest.mark.parametrize("loader", [load_relation_dataset, load_analogy_dataset, load_classification_dataset])
def test_unknown_name(loader: Any) -> None:
    with pytest.raises(DataError) as exc:
        loader("no_such_benchmark")
    message = str(exc.value)
    assert "unknown dataset 'no_such_benchmark'" in message and "; fix:" in message


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_analogy_dataset(str(tmp_path / "nope" / "test.jsonl"))


# --------------------------------------------------------------------------- hub


def test_hub_analogy_and_relation(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    hub = FakeHub({"validation": [GOOD_ANALOGY, ana(answer=0)]})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    data = load_analogy_dataset("relbert/analogy_questions:sat", "valid")
    assert hub.calls == [("relbert/analogy_questions", "sat", "validation")]
    assert data.name == "relbert/analogy_questions:sat" and len(data) == 2
    assert data.questions[0].choices[1] == ("e", "f")

    hub = FakeHub({"train": [{**GOOD_RELATION, "relation_type": "8d"}]})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    relations = load_relation_dataset("relbert/semeval2012_relational_similarity")
    assert hub.calls == [("relbert/semeval2012_relational_similarity", None, "train")]
    assert relations.relations[0].parent == "8"


def test_hub_classification_all_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    hub = FakeHub({"train": [GOOD_LEXICAL, lex(relation="mero")], "validation": [GOOD_LEXICAL],
                   "test": [lex(relation="mero")]})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    data = load_classification_dataset("relbert/lexical_relation_classification:BLESS")
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 2, "validation": 1, "test": 1}
    assert data.labels == ["hyper", "mero"]


def test_hub_row_goes_through_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    hub = FakeHub({"test": [GOOD_ANALOGY, ana(answer=9)]})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    with pytest.raises(DataError) as exc:
        load_analogy_dataset("relbert/analogy_questions:u2")
    message = str(exc.value)
    assert "hub dataset relbert/analogy_questions:u2 split test row 1" in message
    assert "answer index 9 is out of range for 3 choices" in message and "; fix:" in message


def test_hub_fetch_failure_says_how_to_work_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'relbert/analogy_questions' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as exc:
        load_analogy_dataset("relbert/analogy_questions:sat")
    message = str(exc.value)
    assert "could not be fetched" in message and "local folder" in message and "relbert schema" in message
