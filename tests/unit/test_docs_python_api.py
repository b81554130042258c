"""docs/PYTHON_API.md: every code block runs as written, in order, in a fresh interpreter.

The page loads ``runs/default/best_model`` (what ``./run.sh train`` exports); here that folder is
the bundled backbone saved with a relbert_config, in a scratch working directory.
"""
import json
import re
import sys

from tests.launch import REPO, rank_env, run

DOC = REPO / "docs" / "PYTHON_API.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

RUNNER = """
import json, sys, warnings
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for i, code in enumerate(blocks):
        print(f"--- block {i}", flush=True)
        exec(compile(code, f"PYTHON_API.md block {i}", "exec"), namespace)
print("--- warnings", json.dumps(sorted({w.category.__name__ for w in caught})), flush=True)
print("--- best", namespace["best"], flush=True)
"""


def code_blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(DOC.read_text())]


def test_every_block_is_python():
    blocks = code_blocks()
    assert len(blocks) >= 8
    assert {language for language, _ in blocks} == {"python"}  # nothing on the page escapes the run below


def test_every_python_block_runs(bundled_model_path, tmp_path):
    from relbert_ds import RelationEncoder

    encoder = RelationEncoder.from_pretrained(bundled_model_path, warn_untrained=False)
    encoder.save_pretrained(tmp_path / "runs" / "default" / "best_model", relbert_compatible=False)
    blocks = [code for _, code in code_blocks()]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    result = run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], timeout=600,
                 env=rank_env(PYTHONPATH=str(REPO)), cwd=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"--- block {len(blocks) - 1}" in result.stdout
    # No warning at all: the examples load a trained model, and the backbone block opts out of its warning.
    assert "--- warnings []" in result.stdout, output
    # What the blocks claim, read back: shapes, the export's files, the analogy's ranking printed.
    assert "(384,) (3, 384)" in result.stdout
    saved = tmp_path / "my-relbert"
    assert (saved / "model.safetensors").is_file() and (saved / "pytorch_model.bin").is_file()
    only = tmp_path / "my-relbert-safetensors-only"
    assert (only / "model.safetensors").is_file() and not (only / "pytorch_model.bin").exists()
    ranked = [line for line in result.stdout.splitlines() if re.match(r"^\d  \w+:\w+  -?\d\.\d{3}$", line)]
    assert len(ranked) == 5
    scores = [float(line.split()[-1]) for line in ranked]
    assert scores == sorted(scores, reverse=True)
    head, tail = ranked[0].split()[1].split(":")
    assert f"--- best {(head, tail)!r}" in result.stdout  # analogy()[0] is the top of the printed ranking
    assert "does not exist" in result.stdout  # the ModelError example printed its one line
