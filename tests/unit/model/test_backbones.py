"""Damaged model folders (issue 9): a truncated or corrupt weights file, missing tokenizer files.

Each must give ONE line (a ModelError) naming the file and the fix, both where the trainer checks
(``RelationEncoder.check_loadable``, on every rank before any collective) and where models load;
and through the real evaluator command line: exit 2, one ``error:`` line, no traceback.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

from relbert_ds import RelationEncoder
from relbert_ds.errors import ModelError
from relbert_ds.model.backbones import check_safetensors_file, check_weight_files
from relbert_ds.model.encoder import write_torch_weights
from tests.assertions import assert_one_error_line, assert_one_line
from tests.launch import REPO, rank_env, run


@pytest.fixture(scope="module")
def saved(tiny_bert, tmp_path_factory) -> Path:
    """A trained-style model folder (relbert_config, safetensors, tokenizer.json), never modified."""
    folder = tmp_path_factory.mktemp("saved")
    RelationEncoder.from_pretrained(tiny_bert, warn_untrained=False).save_pretrained(folder, relbert_compatible=False)
    return folder


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def test_intact_folders_pass(saved, bundled_model_path):
    assert check_weight_files(saved) == saved / "model.safetensors"
    check_safetensors_file(Path(bundled_model_path) / "model.safetensors")  # a real 90 MB model


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0005, 0.0])
def test_truncated_safetensors(copy, keep):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = copy / "model.safetensors"
    truncate(weights, keep)
    with pytest.raises(SafetensorError):
        load_file(str(weights))  # what users saw before: the library's own traceback
    for load in (RelationEncoder.check_loadable, RelationEncoder.from_pretrained):
        with pytest.raises(ModelError) as error:
            load(str(copy))
        assert_one_line(error, str(weights), "incomplete or corrupt", "download it again")


def test_safetensors_with_extra_bytes_or_garbage_header(copy):
    weights = copy / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original + b"\0" * 64)
    with pytest.raises(ModelError) as error:
        check_weight_files(copy)
    assert_one_line(error, "incomplete or corrupt", f"{len(original) + 64} bytes where its header says {len(original)}")
    weights.write_bytes(original[:8] + b"{not json" + original[17:])
    with pytest.raises(ModelError) as error:
        check_weight_files(copy)
    assert_one_line(error, "header is unreadable")
    weights.write_bytes(b"<html>503 Service Unavailable</html>" + original[40:])  # a proxy's error page
    with pytest.raises(ModelError) as error:
        check_weight_files(copy)
    assert_one_line(error, "not a safetensors header")


def test_truncated_or_corrupt_pytorch_model_bin(copy):
    write_torch_weights(copy)
    (copy / "model.safetensors").unlink()
    weights = copy / "pytorch_model.bin"
    original = weights.read_bytes()
    assert check_weight_files(copy) == weights  # whole: fine
    truncate(weights, 0.9)
    with pytest.raises(ModelError) as error:
        RelationEncoder.check_loadable(str(copy))
    assert_one_line(error, str(weights), "incomplete or corrupt", "central directory")
    # Whole zip, damaged pickle inside: only reading it shows it; the load says so in one line too.
    start = original.index(b"\x80\x02", original.index(b"data.pkl"))
    weights.write_bytes(original[:start] + b"garbage!" + original[start + 8:])
    check_weight_files(copy)
    with pytest.raises(ModelError) as error:
        RelationEncoder.from_pretrained(str(copy))
    assert_one_line(error, str(weights), "incomplete or corrupt", "reading it failed")


def test_missing_shard_and_missing_weights(saved, tmp_path, tiny_bert):
    sharded = tmp_path / "sharded"
    encoder = RelationEncoder.from_pretrained(tiny_bert, warn_untrained=False)
    encoder.backbone.save_pretrained(str(sharded), max_shard_size="1MB")
    encoder.tokenizer.save_pretrained(str(sharded))
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    truncate(shards[1])
    with pytest.raises(ModelError) as error:
        RelationEncoder.check_loadable(str(sharded))
    assert_one_line(error, str(shards[1]), "incomplete or corrupt")
    shards[1].unlink()
    with pytest.raises(ModelError) as error:
        RelationEncoder.check_loadable(str(sharded))
    assert_one_line(error, f"lacks {shards[1].name}")
    empty = Path(shutil.copytree(saved, tmp_path / "no_weights"))
    (empty / "model.safetensors").unlink()
    with pytest.raises(ModelError) as error:
        RelationEncoder.check_loadable(str(empty))
    assert_one_line(error, "has no weights")


def test_missing_tokenizer_files(copy, bundled_model_path, tmp_path):
    # Before the check, this folder "loaded" with a 5-token vocabulary: every word became [UNK].
    (copy / "tokenizer.json").unlink()
    for load in (RelationEncoder.check_loadable, RelationEncoder.from_pretrained):
        with pytest.raises(ModelError) as error:
            load(str(copy))
        assert_one_line(error, str(copy), "no tokenizer vocabulary", "tokenizer.json")
    # One of the vocabulary files is enough: the bundled backbone without tokenizer.json keeps vocab.txt.
    partial = tmp_path / "vocab_only"
    partial.mkdir()
    for f in Path(bundled_model_path).iterdir():
        if f.is_file() and f.name != "tokenizer.json":
            (partial / f.name).symlink_to(f)
    _, _, tokenizer, _ = RelationEncoder.check_loadable(str(partial))
    assert len(tokenizer) == 30522 and tokenizer("paris")["input_ids"][1] != tokenizer.unk_token_id


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "tokenizer.json"])
def test_truncated_json_file_is_named(copy, name):
    truncate(copy / name, 0.4)
    with pytest.raises(ModelError) as error:
        RelationEncoder.check_loadable(str(copy))
    assert_one_line(error, str(copy / name), "incomplete or corrupt", "not valid JSON")


FAST_TRAIN = ["--max_steps", "2", "--epochs", "10", "--metric", "none", "--analogy", "--no-projector",
              "--relations_per_rank", "4", "--positives_per_relation", "4", "--negatives_per_relation", "4"]


def _command(tool: str, model: Path) -> list[str]:
    if tool == "evaluate":
        return [sys.executable, "-m", "relbert_ds.cli.evaluate", "--model", str(model), "--analogy", "sat",
                "--classification", "none", "--split", "valid"]
    return [sys.executable, "-m", "relbert_ds.cli.train", "--model", str(model), "--output_dir",
            str(model.parent / "run"), *FAST_TRAIN]


@pytest.mark.parametrize("tool, fault", [("evaluate", "truncated_weights"), ("evaluate", "missing_tokenizer"),
                                         ("train", "truncated_weights")])
def test_command_line_prints_one_error_line(copy, tool, fault):
    if fault == "truncated_weights":
        truncate(copy / "model.safetensors", 0.3)
        expect = (str(copy / "model.safetensors"), "incomplete or corrupt", "fix:")
    else:
        (copy / "tokenizer.json").unlink()
        expect = (str(copy), "no tokenizer vocabulary", "fix:")
    result = run(_command(tool, copy), timeout=600, env=rank_env(), cwd=str(REPO))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert_one_error_line(output, *expect)
