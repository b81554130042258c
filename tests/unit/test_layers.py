"""The layers of relbert_ds, as docs/ARCHITECTURE.md's table states them, checked on every import.

Every ``import`` in the package is walked (function-local ones and ``if TYPE_CHECKING`` ones too:
a layer that needs another's types depends on it), ``from pkg import name`` resolved to the submodule
when ``name`` is one. A fresh interpreter then measures what using a ``RelationEncoder`` loads.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_bert

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "relbert_ds"
FOREIGN = ("benchmarks", "tests", "launchers")
ENTRY_POINTS = {"train", "evaluate", "push", "plot"}
BASE = {"errors", "_version_check", "progress"}


def layer_rules(architecture: Path = REPO / "docs" / "ARCHITECTURE.md") -> dict[str, set[str]]:
    """{layer: layers it may import}, parsed from the table between the layer-rules markers."""
    text = architecture.read_text(encoding="utf-8")
    table = re.search(r"<!-- layer rules.*?-->(.*?)<!-- end layer rules -->", text, re.S)
    assert table, f"{architecture} has no layer rules table"
    rules = {}
    for line in table.group(1).strip().splitlines()[2:]:  # skip the header and the |---| row
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rules[cells[0]] = {name.strip() for name in cells[1].split(",") if name.strip()}
    return rules


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in BASE:
        return "base"
    if len(parts) == 2 and parts[1] in ENTRY_POINTS:
        return "entry"
    return parts[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in a file; ``from a import b`` yields ``a.b`` when that
    is a module of the package, else ``a``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                as_module = root.parent.joinpath(*candidate.split("."))
                yield node.lineno, (candidate if as_module.with_suffix(".py").is_file()
                                    or (as_module / "__init__.py").is_file() else source)


def violations(root: Path, rules: dict[str, set[str]]) -> list[str]:
    """Every forbidden edge in the package at ``root``, as ``file:line: a (layer) -> b (layer)``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        source_layer = layer_of(importer)
        for line, target in imports_of(path, root):
            top = target.split(".")[0]
            where = f"{path.relative_to(root.parent)}:{line}: {importer} ({source_layer}) -> {target}"
            if top in FOREIGN:
                found.append(f"{where}: the library never imports {top}/")
            elif top == "deepspeed" and source_layer not in ("training", "cli"):
                found.append(f"{where}: only training (and cli) import DeepSpeed")
            elif target.startswith("torch.distributed") and source_layer not in ("parallel",):
                found.append(f"{where}: collectives go through relbert_ds.parallel")
            elif top == PACKAGE:
                target_layer = layer_of(target)
                if source_layer not in rules:
                    found.append(f"{where}: layer {source_layer!r} is not in the table")
                elif target_layer != source_layer and target_layer not in rules[source_layer]:
                    found.append(f"{where} ({target_layer}): {source_layer} may import only "
                                 f"{', '.join(sorted(rules[source_layer])) or 'nothing of relbert_ds'}")
    return found


def cycles(root: Path) -> list[list[str]]:
    """Import circles between modules of a package, function-local imports included (a circle
    broken only by deferring an import is still a circle in the design)."""
    graph = {module_name(path, root): {t for _, t in imports_of(path, root) if t.split(".")[0] == root.name}
             for path in root.rglob("*.py")}
    # A package's __init__ is loaded by each of its submodules: parent edges are not circles.
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_rules_table_names_every_layer_of_the_package():
    rules = layer_rules()
    layers = {layer_of(module_name(p, REPO / PACKAGE)) for p in (REPO / PACKAGE).rglob("*.py")}
    assert layers == set(rules), f"layers in the package {sorted(layers)} vs the table {sorted(rules)}"
    for layer, allowed in rules.items():
        assert allowed <= set(rules), f"{layer} names an unknown layer: {allowed - set(rules)}"


def test_every_import_in_the_package_respects_the_layers():
    assert violations(REPO / PACKAGE, layer_rules()) == []


def test_a_planted_forbidden_import_is_found(tmp_path):
    copy = tmp_path / PACKAGE
    shutil.copytree(REPO / PACKAGE, copy, ignore=shutil.ignore_patterns("resources", "__pycache__"))
    assert violations(copy, layer_rules()) == []
    # The model layer reaching up into the evaluator, function-local (the circle this layout broke).
    encoder = copy / "model" / "encoder.py"
    encoder.write_text(encoder.read_text() + "\n\ndef _planted():\n    from relbert_ds.evaluation import sharding\n")
    (copy / "data" / "readers.py").write_text((copy / "data" / "readers.py").read_text()
                                              + "\nfrom ..parallel import distributed  # noqa\n")
    (copy / "evaluation" / "cache.py").write_text((copy / "evaluation" / "cache.py").read_text()
                                                  + "\nimport benchmarks.common  # noqa\n")
    found = violations(copy, layer_rules())
    assert len(found) == 3, found
    assert "relbert_ds.model.encoder (model) -> relbert_ds.evaluation.sharding" in found[2] or any(
        "relbert_ds.model.encoder (model) -> relbert_ds.evaluation.sharding (evaluation)" in f for f in found)
    assert any("relbert_ds.data.readers (data) -> relbert_ds.parallel.distributed (parallel)" in f for f in found)
    assert any("never imports benchmarks/" in f for f in found)


@pytest.mark.parametrize("package", [PACKAGE, "benchmarks"])
def test_no_import_circle(package):
    assert cycles(REPO / package) == []


def test_a_planted_circle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("from pkg import c\n\ndef f():\n    pass\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(pkg) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


USE_THE_ENCODER = r"""
import json, sys
import torch
from relbert_ds import RelationEncoder
encoder = RelationEncoder.from_pretrained(sys.argv[1], warn_untrained=False)
vectors = encoder.encode([("paris", "france"), ("rome", "italy")], batch_size=2)
encoder.similarity(("paris", "france"), ("rome", "italy"))
encoder.analogy(("paris", "france"), [("rome", "italy"), ("cat", "dog")])
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("relbert_ds", "deepspeed")))))
"""


def test_using_the_encoder_loads_neither_evaluator_training_parallel_nor_deepspeed(tmp_path):
    # Built here: transformers' save_pretrained itself imports DeepSpeed when it is installed.
    model = make_tiny_bert(tmp_path / "tiny")
    result = subprocess.run([sys.executable, "-c", USE_THE_ENCODER, model], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "relbert_ds.model.encoder" in loaded  # the measurement sees the package at all
    forbidden = [m for m in loaded if m.startswith(("relbert_ds.evaluation", "relbert_ds.training",
                                                    "relbert_ds.parallel", "deepspeed"))]
    assert forbidden == []
