"""Resolve a dataset source string and load it into the relbert schema records.

A source is, tried in this order:

1. an existing local path: a ``.jsonl`` file (used as the requested split directly) or a folder
   of ``<split>.jsonl`` files;
2. a bundled dataset name (case-insensitive, with aliases such as ``"K&H+N"``);
3. the name of one of the RelBERT paper's evaluation sets that is not bundled (``"scan"``,
   ``"CogALexV"``, ...: :data:`HUB_NAMES`), which stands for its hub id;
4. a Hugging Face dataset id ``owner/name`` with an optional ``:config``. A hub id is looked
   for first on disk, as ``<data dir>/<owner>/<name>/<config>/<split>.jsonl`` (the data dir is
   the ``data_dir`` argument, else ``$RELBERT_DS_DATA``), then through ``datasets``; when
   neither has it (offline, say) the error names the folder to supply;

anything else is a :class:`DataError`. ``"valid"`` and ``"validation"`` name the same split
everywhere (bundled analogy files are ``valid.jsonl``, the others ``validation.jsonl``, the hub
uses ``validation``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from relbert_ds.data import readers
from relbert_ds.data.schemas import AnalogyDataset, ClassificationDataset, LexicalPair, RelationDataset
from relbert_ds.errors import DataError

BUNDLED_RELATION: tuple[str, ...] = ("semeval2012",)
BUNDLED_ANALOGY: tuple[str, ...] = ("sat", "u2", "u4", "google", "bats")
BUNDLED_CLASSIFICATION: tuple[str, ...] = ("BLESS", "KHN")

ANALOGY_HUB = "relbert/analogy_questions"
CLASSIFICATION_HUB = "relbert/lexical_relation_classification"
# Every evaluation set of the RelBERT paper's table (2023 version), by hub id.
PAPER_ANALOGY: tuple[str, ...] = tuple(f"{ANALOGY_HUB}:{c}" for c in (
    "sat", "u2", "u4", "google", "bats", "t_rex_relational_similarity", "conceptnet_relational_similarity",
    "nell_relational_similarity", "scan"))
PAPER_CLASSIFICATION: tuple[str, ...] = tuple(f"{CLASSIFICATION_HUB}:{c}" for c in (
    "BLESS", "CogALexV", "EVALution", "K&H+N", "ROOT09"))
DATA_DIR_ENV = "RELBERT_DS_DATA"

_DATA_ROOT = Path(__file__).resolve().parent.parent / "resources" / "data"
_KIND_ROOTS = {
    "relation": _DATA_ROOT,
    "analogy": _DATA_ROOT / "analogy",
    "classification": _DATA_ROOT / "classification",
}
_BUNDLED = {"relation": BUNDLED_RELATION, "analogy": BUNDLED_ANALOGY, "classification": BUNDLED_CLASSIFICATION}
# Lower-cased spelling -> bundled name.
_ALIASES: dict[str, dict[str, str]] = {
    kind: {name.lower(): name for name in names} for kind, names in _BUNDLED.items()
}
_ALIASES["relation"]["semeval"] = "semeval2012"
_ALIASES["classification"].update({"k&h+n": "KHN", "kh+n": "KHN"})
# Plain names of the paper's sets that are not bundled (lower-cased) -> hub id.
HUB_NAMES: dict[str, dict[str, str]] = {
    "relation": {},
    "analogy": {label.split(":")[1].lower(): label for label in PAPER_ANALOGY
                if label.split(":")[1] not in BUNDLED_ANALOGY},
    "classification": {label.split(":")[1].lower(): label for label in PAPER_CLASSIFICATION
                       if label.split(":")[1] not in ("BLESS", "K&H+N")},
}
HUB_NAMES["classification"]["cogalex-v"] = f"{CLASSIFICATION_HUB}:CogALexV"

# "owner/name" or "owner/name:config" (Hugging Face repo id rules, loosely).
_HUB_ID = re.compile(r"^(\w[\w.-]*/\w[\w.-]*)(?::([^:/\s]+))?$")
_VALID_SPELLINGS = ("validation", "valid")
_SPLIT_ORDER = ("train", "validation", "test")

@dataclass(frozen=True)
class ResolvedSource:
    """Where a source string points: a local file/folder or a hub dataset."""

    name: str
    path: Optional[Path] = None  # absolute local .jsonl file or folder
    hub_id: Optional[str] = None  # "owner/name"
    hub_config: Optional[str] = None
    data_dir: Optional[Path] = None  # where a local copy of a hub dataset was looked for

    @property
    def hub_label(self) -> str:
        """``owner/name`` or ``owner/name:config``, as the user wrote it."""
        return f"{self.hub_id}:{self.hub_config}" if self.hub_config else str(self.hub_id)


def canonical_split(split: str) -> str:
    """``"valid"`` -> ``"validation"``; other names unchanged."""
    return "validation" if split in _VALID_SPELLINGS else split


def bundled_path(kind: str, name: str) -> Path:
    """Folder of a bundled dataset.

    Args:
        kind: ``"relation"``, ``"analogy"`` or ``"classification"``.
        name: a bundled name or alias, case-insensitive (e.g. ``"sat"``, ``"K&H+N"``).
    """
    if kind not in _KIND_ROOTS:
        raise DataError(f"unknown dataset kind '{kind}'; fix: use one of relation, analogy, classification")
    bundled = _ALIASES[kind].get(name.strip().lower())
    if bundled is None:
        raise DataError(f"no bundled {kind} dataset '{name}'; fix: use one of {', '.join(_BUNDLED[kind])}")
    return _KIND_ROOTS[kind] / bundled


def data_dir_root(data_dir: Optional[str | Path] = None) -> Optional[Path]:
    """The folder of local hub copies: ``data_dir``, else ``$RELBERT_DS_DATA``, else None."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen else None


def hub_copy_folder(root: Path, hub_id: str, config: Optional[str]) -> Path:
    """``<root>/<owner>/<name>/<config>`` (``<root>/<owner>/<name>`` without a config)."""
    folder = root.joinpath(*hub_id.split("/"))
    return folder / config if config else folder


def resolve_source(source: str, kind: str, data_dir: Optional[str | Path] = None) -> ResolvedSource:
    """Resolve ``source`` for a dataset ``kind`` (see the module docstring for the order)."""
    choices = ", ".join(_BUNDLED[kind])
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"empty dataset source {source!r}; fix: give a local .jsonl file/folder or one of {choices}")
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return ResolvedSource(name=path.name, path=path)
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: not a .jsonl file; fix: convert it to JSON Lines in the relbert schema "
                            "or pass the folder that holds <split>.jsonl files")
        return ResolvedSource(name=path.parent.name, path=path)
    bundled = _ALIASES[kind].get(source.strip().lower())
    if bundled is not None:
        return ResolvedSource(name=bundled, path=_KIND_ROOTS[kind] / bundled)
    hub_label = HUB_NAMES[kind].get(source.strip().lower())
    match = _HUB_ID.match(hub_label or source)
    if match and not source.endswith(".jsonl"):
        name = source if hub_label is None else hub_label.split(":")[1]
        root = data_dir_root(data_dir)
        if root is not None and hub_copy_folder(root, match.group(1), match.group(2)).is_dir():
            return ResolvedSource(name=name, path=hub_copy_folder(root, match.group(1), match.group(2)).resolve())
        return ResolvedSource(name=name, hub_id=match.group(1), hub_config=match.group(2), data_dir=root)
    if source.endswith(".jsonl") or "/" in source or "\\" in source:
        # Clearly meant as a path: say so rather than trying the hub.
        raise DataError(f"no such file or folder: {source}; fix: check the path, or use one of {choices}")
    raise DataError(f"unknown dataset '{source}'; fix: give a local .jsonl file/folder or one of {choices}")


def _present_splits(folder: Path) -> list[str]:
    """Split names of a folder's ``*.jsonl`` files, train/validation/test first."""
    def order(name: str) -> tuple[int, str]:
        split = canonical_split(name)
        return (_SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER), name)

    return sorted((p.stem for p in folder.glob("*.jsonl") if p.is_file()), key=order)


def _split_file(folder: Path, split: str) -> Path:
    """The file of ``split`` in ``folder``, accepting valid/validation either way."""
    spellings = _VALID_SPELLINGS if split in _VALID_SPELLINGS else (split,)
    for spelling in spellings:
        candidate = folder / f"{spelling}.jsonl"
        if candidate.is_file():
            return candidate
    present = _present_splits(folder)
    looked_for = ", ".join(f"{s}.jsonl" for s in spellings)
    if not present:
        raise DataError(f"{folder}: no split '{split}' (looked for {looked_for}) and no .jsonl files at all; "
                        "fix: put the data in <split>.jsonl files in that folder")
    raise DataError(f"{folder}: no split '{split}' (looked for {looked_for}); splits present: "
                    f"{', '.join(present)}; fix: ask for one of those splits or add {split}.jsonl")


def _local_file(resolved: ResolvedSource, split: str) -> Path:
    assert resolved.path is not None
    return resolved.path if resolved.path.is_file() else _split_file(resolved.path, split)


def _fetch_hub(resolved: ResolvedSource, split: Optional[str]) -> Any:
    """``datasets.load_dataset(id, config, split=...)``; any failure becomes a DataError."""
    where = f"hub dataset {resolved.hub_label}" + (f" split {split}" if split else "")
    root = str(resolved.data_dir) if resolved.data_dir is not None else f"${DATA_DIR_ENV}"
    layout = hub_copy_folder(Path(root), str(resolved.hub_id), resolved.hub_config) / "<split>.jsonl"
    fix = (f"check the id, config and split name; offline, put its splits at {layout} (set --data_dir or "
           f"${DATA_DIR_ENV}; splits train/validation/test.jsonl for classification, valid/test.jsonl for analogy) "
           "or pass a local folder of <split>.jsonl files in the relbert schema instead")
    try:
        import datasets  # lazy: slow to import and only needed for hub sources
    except ImportError:
        raise DataError(f"{where}: cannot be fetched because the 'datasets' package is not installed; "
                        f"fix: {fix}") from None
    try:
        hf_split = canonical_split(split) if split else None  # the hub names it "validation"
        return datasets.load_dataset(resolved.hub_id, resolved.hub_config, split=hf_split)
    except Exception as exc:  # network, auth, unknown config/split: datasets raises many types
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{where}: could not be fetched ({type(exc).__name__}: {detail}) and no local "
                        f"file or folder of that name exists; fix: {fix}".replace("\n", " ")) from exc


@dataclass(frozen=True)
class _SplitRows:
    """The raw rows of one split, plus how to name it in messages and records."""

    rows: Iterable[readers.Row]
    origin: str  # "<file>" or "hub dataset <id> split <s>", for file-level messages
    source: str  # absolute file path or hub id, for the dataset's ``source``
    path: Optional[Path] = None  # the local file, if any


def _split_rows(resolved: ResolvedSource, split: str) -> _SplitRows:
    if resolved.hub_id is not None:
        rows = readers.hub_rows(_fetch_hub(resolved, split), resolved.hub_label, split)
        return _SplitRows(rows, f"hub dataset {resolved.hub_label} split {split}", resolved.hub_label)
    path = _local_file(resolved, split)
    return _SplitRows(readers.iter_jsonl(path), str(path), str(path), path)


def load_relation_dataset(source: str = "semeval2012", split: str = "train") -> RelationDataset:
    """Load one split of a relational-similarity dataset (one record per relation).

    Args:
        source: local ``.jsonl`` file or folder, bundled name (``"semeval2012"``), or hub id
            (``"relbert/semeval2012_relational_similarity"``).
        split: ``"train"``, ``"validation"``/``"valid"``, ...; ignored for a single-file source
            except as the returned ``split`` label.

    Raises:
        DataError: unknown source, missing split, or an invalid record.
    """
    resolved = resolve_source(source, "relation")
    data = _split_rows(resolved, split)
    parents = None
    if data.path is not None and (data.path.parent / "relations.json").is_file():
        # A relations.json beside the file (the bundled SemEval has one) gives parent categories.
        parents = readers.read_parent_map(data.path.parent / "relations.json")
    groups = readers.relation_groups(data.rows, data.origin, parents)
    return RelationDataset(name=resolved.name, split=split, relations=groups, source=data.source)


def load_analogy_dataset(source: str, split: str = "test", data_dir: Optional[str | Path] = None) -> AnalogyDataset:
    """Load one split of a multiple-choice analogy benchmark.

    Args:
        source: local ``.jsonl`` file or folder, bundled name (one of :data:`BUNDLED_ANALOGY`),
            or hub id with config (``"relbert/analogy_questions:sat"``).
        split: ``"test"`` or ``"valid"``/``"validation"``.
        data_dir: folder of local hub copies (default ``$RELBERT_DS_DATA``; see the module docstring).

    Raises:
        DataError: unknown source, missing split, or an invalid record.
    """
    resolved = resolve_source(source, "analogy", data_dir)
    data = _split_rows(resolved, split)
    questions = readers.analogy_questions(data.rows, data.origin)
    return AnalogyDataset(name=resolved.name, split=split, questions=questions, source=data.source)


def load_classification_dataset(source: str, splits: Optional[Sequence[str]] = None,
                                data_dir: Optional[str | Path] = None) -> ClassificationDataset:
    """Load a lexical relation classification benchmark.

    Args:
        source: local folder (needs ``train.jsonl`` and ``test.jsonl``) or single ``.jsonl`` file,
            bundled name (``"BLESS"``, ``"KHN"``/``"K&H+N"``), or hub id with config
            (``"relbert/lexical_relation_classification:BLESS"``).
        splits: the splits to load; None loads every split present. Keys of the result are
            canonical (``"valid"`` is stored as ``"validation"``).
        data_dir: folder of local hub copies (default ``$RELBERT_DS_DATA``; see the module docstring).

    Raises:
        DataError: unknown source, missing split or file, an invalid record, or a validation/test
            label that never occurs in train.
    """
    resolved = resolve_source(source, "classification", data_dir)
    loaded: dict[str, tuple[LexicalPair, ...]] = {}
    label_sites: dict[str, dict[str, str]] = {}

    def add(split: str, parsed: tuple[tuple[LexicalPair, ...], dict[str, str]]) -> None:
        loaded[canonical_split(split)], label_sites[canonical_split(split)] = parsed

    if resolved.hub_id is not None:
        if splits is None:
            # One call without split returns every split the hub dataset has.
            for split, rows in _fetch_hub(resolved, None).items():
                add(split, readers.lexical_pairs(readers.hub_rows(rows, resolved.hub_label, split),
                                                 f"hub dataset {resolved.hub_label} split {split}"))
        else:
            for split in splits:
                data = _split_rows(resolved, split)
                add(split, readers.lexical_pairs(data.rows, data.origin))
        origin = resolved.hub_label
    else:
        assert resolved.path is not None
        path = resolved.path
        if path.is_file():
            # A single file is one split: the one asked for, else the one its name says.
            if splits is not None and len(splits) != 1:
                raise DataError(f"{path}: a single file holds one split but {len(splits)} were requested; "
                                "fix: pass the folder holding train.jsonl and test.jsonl instead")
            split = splits[0] if splits is not None else path.stem
            add(split, readers.lexical_pairs(readers.iter_jsonl(path), str(path)))
        else:
            present = _present_splits(path)
            if "train" not in present or "test" not in present:
                raise DataError(f"{path}: a classification folder needs train.jsonl and test.jsonl "
                                f"(validation.jsonl optional); found: {', '.join(present) or 'no .jsonl files'}; "
                                "fix: add the missing files or point at the right folder")
            for split in (present if splits is None else splits):
                file = _split_file(path, split)
                add(split, readers.lexical_pairs(readers.iter_jsonl(file), str(file)))
        origin = str(path)
    readers.check_labels_seen_in_train(label_sites)
    return ClassificationDataset(name=resolved.name, splits=loaded, source=origin)
