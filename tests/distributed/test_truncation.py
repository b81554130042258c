"""Prompts longer than max_length are announced: one ``warning:`` line from rank 0 with the count and the
longest (real 2-rank start-up on a copy of SemEval-2012 with one overlong pair)."""
import json
import shutil

import pytest
from transformers import AutoTokenizer

from relbert_ds.model.prompts import TEMPLATES, fill_template
from tests.launch import REPO, check, run, torchrun_cmd

pytestmark = pytest.mark.slow
LONG_HEAD = " ".join(["alpha"] * 300)  # WordPiece cuts words, not phrases: 300 tokens


def test_overlong_training_prompts_are_reported_once(tiny_bert, tmp_path):
    data = tmp_path / "semeval_long"
    shutil.copytree(REPO / "relbert_ds" / "resources" / "data" / "semeval2012", data)
    lines = (data / "train.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["positives"][0] = [LONG_HEAD, "spear"]
    (data / "train.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    out = tmp_path / "run"
    result = check(run(torchrun_cmd("launchers/train.py", "--model", tiny_bert, "--output_dir", str(out),
                                    "--train_data", str(data), "--max_steps", "1", "--metric", "none", "--analogy",
                                    "--no-projector", "--deepspeed_config", "ds_configs/zero2.json"), timeout=300))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "TruncationWarning" not in result.stderr  # our one-line form, not Python's
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    want = len(tokenizer(fill_template(TEMPLATES["d"], LONG_HEAD, "spear", tokenizer.mask_token))["input_ids"])
    assert want > 300
    unique = len({tuple(p) for r in map(json.loads, (data / "train.jsonl").read_text().splitlines())
                  for p in r["positives"] + r["negatives"]})
    assert f"1 of {unique} training pairs have prompts longer than max_length 64 tokens" in warnings[0]
    assert f"has {want}); raise --max_length" in warnings[0]
