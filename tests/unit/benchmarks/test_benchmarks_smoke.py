"""The benchmarks' pure parts, in one process: helpers, the public scheme's batches and loss,
negatives counted from the loss masks, the memory estimates against DeepSpeed's estimators.
No timing is asserted anywhere."""
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import common


def test_summary_ratio_and_table(tmp_path):
    s = common.summary([3.0, 1.0, 2.0, float("nan")])
    assert s == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0, "mean": 2.0}
    r = common.ratio_summary([2.0, 3.0], [1.0, 2.0])
    assert r["median"] == pytest.approx(1.75) and r["min"] == 1.5 and r["max"] == 2.0
    table = common.markdown_table(["a", "b"], [[1.23456, None], ["x", float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | n/a |", "| x | n/a |"]
    path = common.write_json(tmp_path / "r.json", {"x": float("inf"), "y": [1, float("nan")]})
    doc = json.loads(path.read_text())
    assert doc["x"] is None and doc["y"] == [1, None] and len(doc["loadavg_end"]) == 3


def test_header_records_machine_and_load():
    head = common.header("memory", ["--no_measure"])
    assert head["command"] == "python benchmarks/memory.py --no_measure"
    assert head["machine"]["cpu_count"] >= 1 and head["machine"]["torch"]
    assert len(head["loadavg_start"]) == 3


class _Tok:
    """Enough of a tokenizer/encoder for PublicScheme without a model."""

    pad_token_id = 0
    max_length = 16

    def __init__(self):
        self.tokenizer = self

    def prompts(self, pairs):
        return [f"{h} {t}" for h, t in pairs]

    def __call__(self, texts, truncation, max_length, padding=None, return_token_type_ids=False):
        ids = [[1] + [2 + (hash(w) % 50) for w in t.split()] + [3] for t in texts]
        if padding == "max_length":
            ids = [x + [0] * (max_length - len(x)) for x in ids]
        return {"input_ids": ids, "attention_mask": [[int(i != 0) for i in x] for x in ids]}


def test_public_scheme_batches_follow_the_public_trainer():
    from benchmarks.arms import PublicScheme
    from relbert_ds.data import load_relation_dataset

    data = load_relation_dataset("semeval2012", "train")
    scheme = PublicScheme(data, _Tok(), num_positive=10, num_negative=400, seed=0)
    assert scheme.steps_per_epoch == 79
    order = scheme.epoch_order()
    assert sorted(order) == sorted(g.relation_type for g in data.relations)
    group = next(g for g in data.relations if g.relation_type == order[0])
    pos, neg = scheme.step_pairs(order[0])
    assert len(pos) == min(10, len(group.positives)) == 8
    assert len(neg) == 400  # own negatives + other relations' positives, sampled down to 400
    own = {tuple(p) for p in group.negatives}
    others = {tuple(p) for g in data.relations if g.relation_type != order[0] for p in g.positives}
    assert set(neg) <= own | others
    tensors = scheme.tensors(pos)
    assert tensors["input_ids"].shape == (8, 16)  # padded to max_length, as the public code does


def test_public_nce_loss_equals_the_written_out_sum():
    from benchmarks.arms import public_nce_loss

    g = torch.Generator().manual_seed(0)
    p, n = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    t = 0.05
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    expected = 0.0
    for i in range(4):
        deno = sum(math.exp(cos(p[i], n[k]) / t) for k in range(7))
        for j in range(4):  # the diagonal i = j is part of the public loss
            e = math.exp(cos(p[i], p[j]) / t)
            expected += -math.log(e / (deno + e + 1e-5))
    assert float(public_nce_loss(p, n, t)) == pytest.approx(expected, rel=1e-9)


def test_negatives_per_sequence_counted_from_the_loss_masks():
    from benchmarks.train_throughput import count_ours
    from relbert_ds.data import load_relation_dataset
    from relbert_ds.training.sampler import RelationAwareSampler

    data = load_relation_dataset("semeval2012", "train")
    one = count_ours(RelationAwareSampler(data, world_size=1, rank=0, relations_per_step=16), 0)
    two = count_ours(RelationAwareSampler(data, world_size=2, rank=0, relations_per_step=16), 0)
    # the global batch, not the rank count, decides the masks
    assert one["anchor_negative_pairs"] == two["anchor_negative_pairs"] and one["sequences"] == two["sequences"]
    assert one["steps"] == 5 and one["sequences_per_step"] == 256 and one["anchors"] == 5 * 128
    # each anchor: its relation's 8 negatives + the 15 other relations' 8 positives (duplicates masked)
    assert 120 <= one["negatives_per_anchor"] <= 128
    assert one["negatives_per_sequence"] == pytest.approx(one["anchor_negative_pairs"] / one["sequences"])


def test_memory_estimates_agree_with_deepspeed(tmp_path):
    from benchmarks import memory

    out = tmp_path / "memory.json"
    assert memory.main(["--no_measure", "--models", "roberta-large", "llama-7b (7B decoder)", "--gpus", "1", "8",
                        "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    params = {m["model"]: m["parameters"] for m in doc["models"]}
    assert 350e6 < params["roberta-large"] < 360e6 and 6.5e9 < params["llama-7b (7B decoder)"] < 6.8e9
    assert doc["formula_checks"] and all(c["agrees"] for c in doc["formula_checks"])
    row = next(r for r in doc["estimates"] if r["model"] == "llama-7b (7B decoder)" and r["gpus"] == 1)
    assert row["zero0"]["fits"] == "no" and row["zero3_offload"]["fits"] == "yes"
    assert row["zero0"]["gpu_gb"] == pytest.approx(20 * params["llama-7b (7B decoder)"] / 1e9)
    assert "| model |" in doc["table_markdown"] and doc["measured"] is None


# --------------------------------------------------------------------------- the real relbert arm's pure parts


class _StubDatasets:
    """The few ``datasets`` names a generated loading script uses (``datasets`` 2.10's are not installed
    here), recording what the script declares so that its splits and examples can be read back."""

    class Version:
        def __init__(self, v):
            self.v = v

    class BuilderConfig:
        def __init__(self, name, version=None):
            self.name = name

    class GeneratorBasedBuilder:
        pass

    class DatasetInfo:
        def __init__(self, features):
            self.features = features

    class SplitGenerator:
        def __init__(self, name, gen_kwargs):
            self.name, self.gen_kwargs = name, gen_kwargs

    @staticmethod
    def Features(d):  # noqa: N802 - datasets' spelling
        return d

    @staticmethod
    def Sequence(x):  # noqa: N802
        return ["seq", x]

    @staticmethod
    def Value(x):  # noqa: N802
        return x


def _run_loading_script(path, config):
    import sys
    import types

    module = types.ModuleType("datasets")
    module.__dict__.update({k: v for k, v in vars(_StubDatasets).items() if not k.startswith("__")})
    saved = sys.modules.get("datasets")
    sys.modules["datasets"] = module
    try:
        namespace = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    finally:
        if saved is not None:
            sys.modules["datasets"] = saved
        else:
            del sys.modules["datasets"]
    builder = namespace["Local"]()
    builder.config = next(c for c in namespace["Local"].BUILDER_CONFIGS if c.name == config)
    splits = {g.name: [r for _, r in builder._generate_examples(**g.gen_kwargs)]
              for g in builder._split_generators(None)}
    return namespace, builder._info().features, splits


def test_loading_scripts_serve_the_bundled_data_under_the_hub_names(tmp_path):
    from benchmarks.relbert_venv import write_loading_scripts
    from relbert_ds.data import load_analogy_dataset, load_relation_dataset
    from relbert_ds.data.sources import BUNDLED_ANALOGY

    written = write_loading_scripts(tmp_path)
    # where datasets 2.10 looks for load_dataset('relbert/<name>') under relbert's working directory
    assert written == {name: tmp_path / "relbert" / name / f"{name}.py"
                       for name in ("semeval2012_relational_similarity", "analogy_questions")}
    ns, features, splits = _run_loading_script(written["semeval2012_relational_similarity"], "default")
    assert set(features) == {"relation_type", "positives", "negatives"} and set(splits) == {"train", "validation"}
    for split in ("train", "validation"):
        ours = load_relation_dataset("semeval2012", split)
        assert [r["relation_type"] for r in splits[split]] == [g.relation_type for g in ours.relations]
        assert [[tuple(p) for p in r["positives"]] for r in splits[split]] == \
            [[tuple(p) for p in g.positives] for g in ours.relations]
    ns, features, splits = _run_loading_script(written["analogy_questions"], "sat")
    assert [c.name for c in ns["Local"].BUILDER_CONFIGS] == list(BUNDLED_ANALOGY)
    assert set(splits) == {"validation", "test"}  # valid.jsonl is the hub's 'validation'
    sat = load_analogy_dataset("sat", "validation")
    assert len(splits["validation"]) == len(sat.questions)
    assert [r["answer"] for r in splits["validation"]] == [q.answer for q in sat.questions]


def test_backbone_converted_to_pytorch_model_bin_has_the_same_tensors(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    from benchmarks.relbert_venv import convert_backbone

    out = convert_backbone(tmp_path / "converted", tiny_bert)
    loaded = torch.load(out / "pytorch_model.bin", weights_only=True)
    original = load_file(f"{tiny_bert}/model.safetensors")
    assert set(loaded) == set(original) and all(torch.equal(loaded[k], original[k]) for k in original)
    assert json.loads((out / "config.json").read_text()) == json.loads(open(f"{tiny_bert}/config.json").read())
    tokenizer_files = [f for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
                       if Path(tiny_bert, f).is_file()]
    assert tokenizer_files and all((out / f).read_bytes() == Path(tiny_bert, f).read_bytes() for f in tokenizer_files)
    assert not (out / "model.safetensors").exists()
    stamp = (out / "pytorch_model.bin").stat().st_mtime_ns
    assert convert_backbone(out, tiny_bert) == out and (out / "pytorch_model.bin").stat().st_mtime_ns == stamp


def test_real_arm_command_line_is_relbert_train_with_the_reference_recipe():
    from benchmarks import public_relbert as pr
    from benchmarks import relbert_driver
    from relbert_ds.model.prompts import resolve_template

    args = pr.relbert_train_args("/b", "/o", lr=3e-5, num_negative=100)
    opts = dict(zip(args[::2], args[1::2]))
    assert len(args) % 2 == 0 and len(opts) == len(args) // 2  # every option has one value
    assert opts["-t"] == resolve_template("d")  # the full text: relbert takes 'd' literally
    assert (opts["-m"], opts["-o"], opts["--loss"], opts["-r"]) == ("/b", "/o", "nce", "3e-05")
    assert (opts["--num-positive"], opts["--num-negative"], opts["-b"], opts["-l"]) == ("10", "100", "32", "64")
    assert (opts["-w"], opts["--temperature"]) == ("10", "0.05")
    assert opts["--aggregation-mode"] == "average_no_mask" and opts["--gradient-accumulation"] == "1"
    cmd = pr.driver_command("/venv/bin/python", args, threads=2)
    assert cmd[:2] == ["/venv/bin/python", str(Path(relbert_driver.__file__).resolve())]
    parsed = relbert_driver.build_parser().parse_args(cmd[2:])  # what the driver in relbert's venv receives
    assert parsed.threads == 2 and parsed.train_args == args


def test_real_trainer_reports_a_child_that_dies_with_its_log(tmp_path):
    import sys

    from benchmarks.public_relbert import RealTrainer

    trainer = RealTrainer(sys.executable, tmp_path / "backbone", tmp_path / "work", timeout_s=60)
    trainer.command = [sys.executable, "-c", "import sys; print('boom in relbert', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited \\(code 3\\) before 'ready'") as info:
        trainer.start()
    assert "boom in relbert" in str(info.value)
    trainer.command = [sys.executable, "-c", "import json, sys; print(json.dumps({'event': 'ready', 'setup_s': 1}), "
                       "flush=True); line = sys.stdin.readline(); print(json.dumps({'event': 'step', 'step': 1, "
                       "'seconds': 0.5, 'got': line.strip()}), flush=True); sys.stdin.readline()"]
    with trainer:
        assert trainer.start()["setup_s"] == 1
        record = trainer.step()
        assert record["got"] == "step" and trainer.steps == 1
    assert trainer.proc is None


def test_relbert_venv_reused_by_its_stamp_and_a_foreign_folder_never_deleted(tmp_path):
    from benchmarks.relbert_venv import STAMP_NAME, ensure_venv

    built = tmp_path / "built"
    (built / "bin").mkdir(parents=True)
    (built / "bin" / "python").write_text("")
    (built / STAMP_NAME).write_text(json.dumps({"relbert": "2.0.2", "created_s": 158.0}))
    log = []
    assert ensure_venv(built, log=log.append) == {"relbert": "2.0.2", "created_s": 158.0, "built_now": False}
    assert log == []  # nothing was run
    foreign = tmp_path / "someone_elses_venv"
    (foreign / "bin").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="was not built by relbert-ds"):
        ensure_venv(foreign, log=log.append)
    assert (foreign / "bin").is_dir() and log == []


def test_measurement_run_sets_each_option_in_its_section_and_refuses_unknown_ones():
    from benchmarks.arms import measurement_run

    run = measurement_run("ds_configs/zero2.json", "m", "/tmp/out", lr=1e-4, relations_per_step=8, dropout=0.0)
    assert (run.train.lr, run.data.relations_per_step, run.model.dropout, run.model.model) == (1e-4, 8, 0.0, "m")
    assert run.validation.metric == "none" and not run.train.tensorboard and not run.train.export_best
    run.validate()  # a valid run config
    with pytest.raises(TypeError, match="no run option 'learning_rate'"):
        measurement_run(None, "m", "/tmp/out", learning_rate=1e-4)


def test_host_planning_runs_both_arms_on_the_same_rows_and_writes_its_json(tmp_path):
    """benchmarks/host_planning.py at small sizes: both arms hand out the rank's rows (prompt counts
    of an even split), the tokenization part runs both arms; the figures are not asserted."""
    from benchmarks import host_planning

    out = tmp_path / "host_planning.json"
    assert host_planning.main(["--world_sizes", "2", "8", "--relations", "100", "--steps", "3",
                               "--prompts_per_rank", "32", "--gpu_step_ms", "2", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["world_size"]: r for r in doc["rows"]}
    assert rows[8]["relations_per_step"] == 64 and rows[8]["ranks_sampled"] == [0, 4, 7]
    assert rows[8]["prompts_per_rank"] == [128] and rows[2]["prompts_per_rank"] == [128]  # 8 groups of 8 + 8
    for arm in ("whole_plan", "own_groups"):
        assert all(r[arm]["n"] == 3 * len(r["ranks_sampled"]) for r in rows.values())
    (tokens,) = doc["tokenization"]
    assert tokens["prompts"] == 32 and tokens["step_inline_ms"] >= 2 and tokens["step_prefetched_ms"] >= 2
