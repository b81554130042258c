"""Parse and validate records of the three relbert schemas, from JSONL files or hub rows.

Every problem becomes a one-line :class:`DataError` of the form
``"<where>: <problem>; fix: <what to do>"`` where ``<where>`` is ``"<file>, line <n>"`` for
files and ``"hub dataset <id> split <s> row <n>"`` for Hugging Face rows. Local files and hub
rows go through the same validators, so both sources accept exactly the same records.
Words are kept exactly as written (no lowercasing, no stripping).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from relbert_ds.data.schemas import (
    AnalogyQuestion,
    LexicalPair,
    Pair,
    RelationGroup,
)
from relbert_ds.errors import DataError

# SemEval-2012 relation ids ("1a" .. "10f"): the digits are the parent category.
SEMEVAL_ID = re.compile(r"^(\d+)([a-z])$")

RELATION_SCHEMA = '{"relation_type": "1a", "positives": [[h, t], ...], "negatives": [[h, t], ...]}'
ANALOGY_SCHEMA = '{"stem": [h, t], "choice": [[h, t], ...], "answer": <0-based index>, "prefix": "..."}'
LEXICAL_SCHEMA = '{"head": h, "tail": t, "relation": label}'


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from (used in every message about it)."""

    where: str  # "<file>, line <n>" or "hub dataset <id> split <s> row <n>"
    data: Any


def data_error(where: str, problem: str, fix: str) -> DataError:
    """Build the one-line error ``"<where>: <problem>; fix: <fix>"``."""
    message = f"{where}: {problem}; fix: {fix}"
    # Messages must stay on one line even when they quote odd user input.
    return DataError(message.replace("\r", "\\r").replace("\n", "\\n"))


# --------------------------------------------------------------------------- raw rows


def iter_jsonl(path: Path) -> Iterator[Row]:
    """Yield one :class:`Row` per non-blank line of a UTF-8 JSONL file.

    Blank lines are skipped but still counted, so line numbers match an editor's.
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise data_error(str(path), f"cannot be read ({exc.strerror})", "check the path and its permissions")
    with handle:
        # Read bytes and decode line by line so a bad byte is reported with its line number.
        for number, raw in enumerate(handle, start=1):
            where = f"{path}, line {number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise data_error(where, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                 "save the file as UTF-8")
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise data_error(where, f"is not valid JSON ({exc.msg} at column {exc.colno})",
                                 "write exactly one JSON object per line")
            yield Row(where, data)


def hub_rows(rows: Iterable[Any], label: str, split: str) -> Iterator[Row]:
    """Wrap the rows of a Hugging Face dataset split; ``row <n>`` is the 0-based index (``ds[n]``)."""
    for index, data in enumerate(rows):
        yield Row(f"hub dataset {label} split {split} row {index}", data)


# --------------------------------------------------------------------------- field checks


def _object(row: Row, schema: str) -> Mapping[str, Any]:
    if not isinstance(row.data, Mapping):
        raise data_error(row.where, f"expected a JSON object, got {_type_name(row.data)}",
                         f"write each record as an object like {schema}")
    return row.data


def _field(row: Row, record: Mapping[str, Any], key: str, schema: str) -> Any:
    if key not in record:
        raise data_error(row.where, f"missing field '{key}'", f"add \"{key}\" to every record: {schema}")
    return record[key]


def _word(row: Row, value: Any, what: str) -> str:
    """A non-empty string, returned unchanged (surrounding whitespace is kept on purpose)."""
    if not isinstance(value, str):
        raise data_error(row.where, f"{what} must be a string, got {_type_name(value)}",
                         f"write {what} as a JSON string")
    if not value.strip():
        raise data_error(row.where, f"{what} is empty or only whitespace ({value!r})",
                         f"give {what} a real word or remove the record")
    return value


def _pair(row: Row, value: Any, what: str) -> Pair:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        shape = f"a list of {len(value)} items" if isinstance(value, (list, tuple)) else _type_name(value)
        raise data_error(row.where, f"{what} must be a list of exactly two strings [head, tail], got {shape}",
                         f"write {what} as [\"head\", \"tail\"]")
    return (_word(row, value[0], f"{what} head"), _word(row, value[1], f"{what} tail"))


def _pairs(row: Row, value: Any, what: str) -> tuple[Pair, ...]:
    if not isinstance(value, (list, tuple)):
        raise data_error(row.where, f"'{what}' must be a list of [head, tail] pairs, got {_type_name(value)}",
                         f"write '{what}' as [[\"head\", \"tail\"], ...]")
    return tuple(_pair(row, item, f"'{what}' item {i}") for i, item in enumerate(value))


def _type_name(value: Any) -> str:
    """JSON-flavoured type names for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _require_records(records: tuple[Any, ...], origin: str) -> None:
    if not records:
        raise data_error(origin, "holds no records (empty or only blank lines)",
                         "point at a file with one JSON record per line")


# --------------------------------------------------------------------------- relational similarity


def read_parent_map(path: Path) -> dict[str, str]:
    """Parent category per relation id from a ``relations.json`` ({"relations": {id: {"parent_id": ..}}})."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise data_error(str(path), f"cannot be read as JSON ({exc})",
                         "repair relations.json or remove it (parents are then read from the records)")
    relations = content.get("relations") if isinstance(content, dict) else None
    if not isinstance(relations, dict):
        raise data_error(str(path), "has no \"relations\" object",
                         'write {"relations": {"<id>": {"parent_id": ...}}} or remove the file')
    parents: dict[str, str] = {}
    for rid, entry in relations.items():
        if isinstance(entry, dict) and entry.get("parent_id") is not None:
            parents[str(rid)] = str(entry["parent_id"])
    return parents


def _relation_group(row: Row) -> RelationGroup:
    record = _object(row, RELATION_SCHEMA)
    relation = _word(row, _field(row, record, "relation_type", RELATION_SCHEMA), "'relation_type'")
    positives = _pairs(row, _field(row, record, "positives", RELATION_SCHEMA), "positives")
    negatives = _pairs(row, _field(row, record, "negatives", RELATION_SCHEMA), "negatives")
    distinct = len(set(positives))
    if distinct < 2:
        raise data_error(
            row.where,
            f"relation '{relation}' has {distinct} distinct positive pairs; "
            "contrastive training needs at least 2 per relation",
            "add positives or remove the relation",
        )
    parent = record.get("parent")
    # None is accepted as "no parent" because hub datasets fill absent columns with null.
    if parent is not None:
        if isinstance(parent, bool) or not isinstance(parent, (str, int)):
            raise data_error(row.where, f"'parent' must be a string or an integer, got {_type_name(parent)}",
                             'write the parent category as e.g. "1" or 1, or drop the field')
        parent = _word(row, parent, "'parent'") if isinstance(parent, str) else str(parent)
    return RelationGroup(relation, positives, negatives, parent)


def relation_groups(rows: Iterable[Row], origin: str,
                    parents: Optional[Mapping[str, str]] = None) -> tuple[RelationGroup, ...]:
    """Validate relational-similarity records (one relation each) and resolve their parents.

    Parent order: the record's ``parent`` field, then ``parents`` (from a relations.json), then the
    digits of a SemEval-style id (``"8d"`` -> ``"8"``), else None.
    """
    groups: list[RelationGroup] = []
    first_seen: dict[str, str] = {}
    for row in rows:
        group = _relation_group(row)
        if group.relation_type in first_seen:
            raise data_error(row.where, f"relation_type '{group.relation_type}' already appears at "
                                        f"{first_seen[group.relation_type]}",
                             "merge the two records or rename one of them")
        first_seen[group.relation_type] = row.where
        if group.parent is None:
            parent = (parents or {}).get(group.relation_type)
            if parent is None:
                match = SEMEVAL_ID.match(group.relation_type)
                parent = match.group(1) if match else None
            if parent is not None:
                group = RelationGroup(group.relation_type, group.positives, group.negatives, parent)
        groups.append(group)
    result = tuple(groups)
    _require_records(result, origin)
    return result


# --------------------------------------------------------------------------- analogy questions


def _analogy_question(row: Row) -> AnalogyQuestion:
    record = _object(row, ANALOGY_SCHEMA)
    stem = _pair(row, _field(row, record, "stem", ANALOGY_SCHEMA), "'stem'")
    choices = _pairs(row, _field(row, record, "choice", ANALOGY_SCHEMA), "choice")
    if len(choices) < 2:
        raise data_error(row.where, f"'choice' has {len(choices)} pairs; a question needs at least 2",
                         "add candidate pairs or remove the question")
    answer = _field(row, record, "answer", ANALOGY_SCHEMA)
    # bool is an int subclass in Python, but true/false is never a meaningful index.
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise data_error(row.where, f"'answer' must be an integer, got {_type_name(answer)}",
                         "write 'answer' as the 0-based index of the right choice")
    if not 0 <= answer < len(choices):
        raise data_error(row.where, f"answer index {answer} is out of range for {len(choices)} choices",
                         f"use a 0-based index between 0 and {len(choices) - 1}")
    prefix = record.get("prefix")
    if prefix is None:  # optional; hub rows may carry null
        prefix = ""
    elif not isinstance(prefix, str):
        raise data_error(row.where, f"'prefix' must be a string, got {_type_name(prefix)}",
                         "write 'prefix' as a string or drop the field")
    return AnalogyQuestion(stem, choices, answer, prefix)


def analogy_questions(rows: Iterable[Row], origin: str) -> tuple[AnalogyQuestion, ...]:
    """Validate multiple-choice analogy records."""
    result = tuple(_analogy_question(row) for row in rows)
    _require_records(result, origin)
    return result


# --------------------------------------------------------------------------- lexical relations


def _lexical_pair(row: Row) -> LexicalPair:
    record = _object(row, LEXICAL_SCHEMA)
    return LexicalPair(
        _word(row, _field(row, record, "head", LEXICAL_SCHEMA), "'head'"),
        _word(row, _field(row, record, "tail", LEXICAL_SCHEMA), "'tail'"),
        _word(row, _field(row, record, "relation", LEXICAL_SCHEMA), "'relation'"),
    )


def lexical_pairs(rows: Iterable[Row], origin: str) -> tuple[tuple[LexicalPair, ...], dict[str, str]]:
    """Validate lexical-relation records.

    Returns the pairs and, per label, where it first occurs (for the unseen-label check).
    """
    pairs: list[LexicalPair] = []
    first_seen: dict[str, str] = {}
    for row in rows:
        pair = _lexical_pair(row)
        first_seen.setdefault(pair.relation, row.where)
        pairs.append(pair)
    result = tuple(pairs)
    _require_records(result, origin)
    return result, first_seen


def check_labels_seen_in_train(label_sites: Mapping[str, Mapping[str, str]]) -> None:
    """Fail when a validation/test label never occurs in train (a classifier could never predict it).

    ``label_sites`` maps split -> {label: where it first occurs}; a no-op without a train split.
    """
    train = label_sites.get("train")
    if train is None:
        return
    for split, sites in label_sites.items():
        if split == "train":
            continue
        for label, where in sites.items():
            if label not in train:
                raise data_error(where, f"label '{label}' occurs in split '{split}' but never in train",
                                 f"add train records labelled '{label}' or remove them from {split}")
