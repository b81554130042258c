"""RelationEncoder: pooling against a manual computation, encode(), save/load, relbert config."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from relbert_ds import RelationEncoder
from relbert_ds.errors import ConfigError, ModelError
from relbert_ds.model.prompts import TEMPLATES

PAIRS = [("cat", "animal"), ("paris", "france"), ("oak", "tree"), ("hammer", "nail"), ("cat", "animal"),
         ("electroencephalography", "neurophysiology")]


def manual_pool(hidden, ids, attention, mode, mask_id):
    """Independent per-row loop: which tokens each mode keeps, then their mean."""
    out = []
    for row in range(ids.shape[0]):
        length = int(attention[row].sum())
        if mode == "last":
            out.append(hidden[row, length - 1])
            continue
        keep = []
        for pos in range(length):
            tok = int(ids[row, pos])
            if (mode == "average" or (mode == "average_no_mask" and tok != mask_id)
                    or (mode == "mask" and tok == mask_id)):
                keep.append(hidden[row, pos])
        out.append(torch.stack(keep).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["average_no_mask", "average", "mask", "last"])
def test_pooling_equals_manual_computation(minilm, mode):
    enc = RelationEncoder(minilm.backbone, minilm.tokenizer, template="d", pooling=mode)
    batch = enc.tokenize(PAIRS)
    with torch.no_grad():
        hidden = enc.backbone(**batch).last_hidden_state
        got = enc(**batch)
    want = manual_pool(hidden, batch["input_ids"], batch["attention_mask"], mode, enc.tokenizer.mask_token_id)
    assert torch.allclose(got, want, atol=1e-6)
    # Rows of different lengths really are padded: the check covers padding handling.
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]


def test_average_no_mask_differs_from_average(minilm):
    a = RelationEncoder(minilm.backbone, minilm.tokenizer, pooling="average").encode(PAIRS[:2])
    b = RelationEncoder(minilm.backbone, minilm.tokenizer, pooling="average_no_mask").encode(PAIRS[:2])
    assert np.abs(a - b).max() > 1e-4


def test_last_pooling_with_left_padding(tiny_llama):
    enc = RelationEncoder.from_pretrained(tiny_llama, template="<subj> is to <obj> as", pooling="last")
    right = enc.encode(PAIRS)
    enc.tokenizer.padding_side = "left"
    left = enc.encode(PAIRS)
    # Causal attention + positions: the last real token sees the same context either way.
    assert np.allclose(right, left, atol=1e-5)


def test_encode_dedupes_batches_by_length_and_keeps_order(minilm):
    seen = []
    hook = minilm.backbone.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        vectors = minilm.encode(PAIRS, batch_size=2)
    finally:
        hook.remove()
    assert vectors.dtype == np.float32 and vectors.shape == (len(PAIRS), 384)
    assert sum(s[0] for s in seen) == len(set(PAIRS))  # each unique pair encoded once
    lengths = [s[1] for s in seen]
    assert lengths == sorted(lengths, reverse=True)  # longest batch first
    assert np.array_equal(vectors[0], vectors[4])
    one_by_one = np.stack([minilm.encode([p])[0] for p in PAIRS])
    assert np.allclose(vectors, one_by_one, atol=1e-5)  # input order, independent of batching


def test_encode_runs_without_grad_and_restores_mode(minilm):
    minilm.train()
    out = minilm.encode(PAIRS[:2], as_tensor=True)
    assert not out.requires_grad and minilm.training
    minilm.eval()


def test_encode_rejects_bad_pairs(minilm):
    with pytest.raises(ConfigError, match="two non-empty strings"):
        minilm.encode([("cat", "")])
    with pytest.raises(ConfigError, match="two non-empty strings"):
        minilm.encode(["cat"])


def test_save_load_round_trip_identical(minilm, tmp_path):
    from transformers import AutoModel

    enc = RelationEncoder(minilm.backbone, minilm.tokenizer, template="a", pooling="mask", max_length=48)
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["relbert_config"] == {"template": TEMPLATES["a"], "aggregation_mode": "mask", "max_length": 48}
    back = RelationEncoder.from_pretrained(str(tmp_path))
    assert (back.template, back.pooling, back.max_length) == (TEMPLATES["a"], "mask", 48)
    assert np.array_equal(back.encode(PAIRS), enc.encode(PAIRS))
    plain = AutoModel.from_pretrained(str(tmp_path))
    assert plain.config.relbert_config["aggregation_mode"] == "mask"


def test_reads_public_relbert_configs(tiny_bert, tmp_path):
    """Folders written by relbert v2 (template, aggregation_mode) and v1 (mode) load with their settings."""
    import shutil

    for key, extra in (("aggregation_mode", {}), ("mode", {"template_mode": "manual"})):
        folder = tmp_path / key
        shutil.copytree(tiny_bert, folder)
        config = json.loads((folder / "config.json").read_text())
        config["relbert_config"] = {"template": TEMPLATES["c"], key: "average", **extra}
        (folder / "config.json").write_text(json.dumps(config))
        enc = RelationEncoder.from_pretrained(str(folder))
        assert (enc.template, enc.pooling, enc.max_length) == (TEMPLATES["c"], "average", 64)
        # Explicit arguments override what the folder says.
        assert RelationEncoder.from_pretrained(str(folder), pooling="mask").pooling == "mask"


def test_backbone_defaults_without_relbert_config(tiny_bert):
    enc = RelationEncoder.from_pretrained(tiny_bert)
    assert (enc.template, enc.pooling) == (TEMPLATES["d"], "average_no_mask")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_decoder_only_backbones(request, fixture):
    path = request.getfixturevalue(fixture)
    with pytest.raises(ModelError, match="no mask token"):
        RelationEncoder.from_pretrained(path)  # default template d has <mask>
    enc = RelationEncoder.from_pretrained(path, template="<subj> is to <obj>", pooling="last")
    assert enc.encode(PAIRS).shape == (len(PAIRS), 32)


def test_bad_model_and_options(tiny_bert, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        RelationEncoder.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        RelationEncoder.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="cannot load model"):
        RelationEncoder.from_pretrained("no-such-org/no-such-model")  # offline: not on disk, hub unreachable
    with pytest.raises(ConfigError, match="unknown pooling"):
        RelationEncoder.from_pretrained(tiny_bert, pooling="max")
    with pytest.raises(ConfigError, match="needs a template with <mask>"):
        RelationEncoder.from_pretrained(tiny_bert, template="<subj> and <obj>", pooling="mask")
    enc = RelationEncoder.from_pretrained(tiny_bert, template="a", pooling="mask", max_length=8)
    with pytest.raises(ConfigError, match="lost its mask token"):
        enc.encode([("a", "b")])


# ---------------------------------------------------------------- relbert-compatible export (pytorch_model.bin)
def _same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and len(a) > 0
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_export_writes_pytorch_model_bin_with_the_same_tensors(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    enc = RelationEncoder.from_pretrained(tiny_bert, template="b", warn_untrained=False)
    # The trainer passes consolidated weights: they, not the module's own, must land in both files.
    state = {k: v.clone() * 2 for k, v in enc.backbone.state_dict().items()}
    enc.save_pretrained(tmp_path, state_dict=state)
    safetensors_weights = load_file(str(tmp_path / "model.safetensors"))
    torch_weights = torch.load(tmp_path / "pytorch_model.bin", weights_only=True, map_location="cpu")
    _same_tensors(safetensors_weights, torch_weights)
    assert len(torch_weights) == len(enc.backbone.state_dict())  # every weight, not a subset
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(torch_weights[key], state[key]) and not torch.equal(torch_weights[key],
                                                                           enc.backbone.state_dict()[key])
    # The folder still loads (from safetensors), and a copy with only the .bin gives the same vectors:
    # what transformers 4.21 inside relbert 2.0.2 reads.
    both = RelationEncoder.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    bin_only = RelationEncoder.from_pretrained(str(tmp_path))
    assert both.template == TEMPLATES["b"]
    assert np.array_equal(both.encode(PAIRS), bin_only.encode(PAIRS))
    assert np.abs(both.encode(PAIRS) - enc.encode(PAIRS)).max() > 1e-3  # the doubled weights, not the originals


def test_export_opt_out_writes_safetensors_only(tiny_bert, tmp_path):
    RelationEncoder.from_pretrained(tiny_bert, warn_untrained=False).save_pretrained(tmp_path, relbert_compatible=False)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()


def test_sharded_safetensors_become_sharded_bins(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    from relbert_ds.model.encoder import write_torch_weights

    enc = RelationEncoder.from_pretrained(tiny_bert, warn_untrained=False)
    enc.backbone.save_pretrained(str(tmp_path), max_shard_size="1MB")
    enc.tokenizer.save_pretrained(str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    written = write_torch_weights(tmp_path)
    bin_index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    assert sorted(bin_index["weight_map"]) == sorted(index["weight_map"]) and len(written) == len(shards) + 1
    for shard in shards:
        bin_shard = "pytorch_" + shard.replace(".safetensors", ".bin")
        _same_tensors(load_file(str(tmp_path / shard)),
                      torch.load(tmp_path / bin_shard, weights_only=True, map_location="cpu"))
        assert all(bin_index["weight_map"][k] == bin_shard for k, v in index["weight_map"].items() if v == shard)
    want = enc.encode(PAIRS)
    for f in [*shards, "model.safetensors.index.json"]:
        (tmp_path / f).unlink()
    assert np.array_equal(RelationEncoder.from_pretrained(str(tmp_path), warn_untrained=False).encode(PAIRS), want)


RELBERT_VENV_PYTHON = Path(__file__).resolve().parents[3] / ".relbert-venv" / "bin" / "python"
RELBERT_EMBED = """
import sys, numpy as np
from relbert import RelBERT
model = RelBERT(sys.argv[1])
np.save(sys.argv[2], np.array(model.get_embedding([list(p) for p in {pairs!r}])))
"""


@pytest.mark.slow
@pytest.mark.skipif(not RELBERT_VENV_PYTHON.exists(),
                    reason="the public relbert 2.0.2 venv is not built (benchmarks/relbert_venv.py builds it)")
def test_export_loads_in_public_relbert_2_0_2(tiny_bert, tmp_path):
    """The real peer: relbert 2.0.2 (transformers 4.21) reads the export as written, same vector directions."""
    import os
    import subprocess

    enc = RelationEncoder.from_pretrained(tiny_bert, template="d", pooling="average_no_mask", warn_untrained=False)
    enc.save_pretrained(tmp_path / "export")
    enc.save_pretrained(tmp_path / "safetensors_only", relbert_compatible=False)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    script = RELBERT_EMBED.format(pairs=PAIRS)

    def relbert(folder):
        return subprocess.run([str(RELBERT_VENV_PYTHON), "-c", script, str(folder), str(tmp_path / "v.npy")],
                              capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)

    ok = relbert(tmp_path / "export")
    assert ok.returncode == 0, ok.stderr[-3000:]
    theirs, ours = np.load(tmp_path / "v.npy").astype(np.float64), enc.encode(PAIRS).astype(np.float64)
    cosine = (theirs * ours).sum(1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)
    assert theirs.shape == ours.shape and np.all(1 - cosine < 1e-6), cosine  # relbert sums where we average
    failed = relbert(tmp_path / "safetensors_only")
    assert failed.returncode != 0 and "pytorch_model.bin" in failed.stderr  # what the .bin fixes
