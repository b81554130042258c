"""relbert-ds-push against a local stand-in for the hub API (no network).

The stand-in (http.server on 127.0.0.1) answers the endpoints huggingface_hub calls for
``create_repo`` and ``create_commit`` (repos/create, validate-yaml, preupload, commit) and keeps
what it receives: the tests compare the uploaded files with the local ones by hash, parse the
card's YAML front matter and check its metadata against the exported run and the evaluator's
results JSON, and check that each hub failure is one ``error:`` line with the folder untouched.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from relbert_ds.cli import push as push_cli
from relbert_ds.publish.model_card import CITATION, build_card
from relbert_ds.training.config import RunConfig
from relbert_ds.training.engine import EMBEDDED_DS_CONFIG
from tests.assertions import assert_one_error_line

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "hf_standin_write_token"


# --------------------------------------------------------------------------- the stand-in hub


class StandInHub:
    """The hub endpoints of create_repo + create_commit, recording repos, commits and stray calls."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.commits: list[dict] = []
        self.validated_yaml: list[str] = []
        self.unexpected: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path == "/api/whoami-v2" and self.headers.get("Authorization") == f"Bearer {TOKEN}":
                    return self._send(200, {"type": "user", "name": "standin-user"})
                hub.unexpected.append(f"GET {self.path}")
                self._send(404, {"error": "not in the stand-in"})

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                        else payload["name"]
                    url = f"http://{self.headers['Host']}/{repo}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": url})
                    hub.repos[repo] = {"private": payload.get("visibility") == "private", "files": {}}
                    return self._send(200, {"url": url})
                if path == "/api/validate-yaml":
                    hub.validated_yaml.append(json.loads(body)["content"])
                    return self._send(200, {})
                parts = path.split("/")  # ['', 'api', 'models', org, name, 'preupload'|'commit', revision]
                if len(parts) == 7 and parts[1:3] == ["api", "models"]:
                    repo = f"{parts[3]}/{parts[4]}"
                    if repo not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    if parts[5] == "preupload":
                        files = json.loads(body)["files"]
                        # Everything as a regular git blob: the content comes inline in the commit.
                        return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False, "oid": None} for f in files]})
                    if parts[5] == "commit":
                        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                        files = {}
                        for item in lines:
                            if item["key"] == "file":
                                assert item["value"]["encoding"] == "base64"
                                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            elif item["key"] != "header":
                                hub.unexpected.append(f"commit item {item['key']}")
                        hub.repos[repo]["files"].update(files)
                        hub.commits.append({"repo": repo, "revision": parts[6], "files": files,
                                            "header": next(i["value"] for i in lines if i["key"] == "header")})
                        return self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/0",
                                                "commitOid": "0" * 40})
                hub.unexpected.append(f"POST {path}")
                self._send(404, {"error": "not in the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StandInHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; the stand-in is local
    with StandInHub() as server:
        yield server
    assert server.unexpected == []


# --------------------------------------------------------------------------- an export and its evaluation


def _tiny_classification_set(directory: Path) -> Path:
    """A few BLESS pairs per relation and split: a real probe run in seconds."""
    source = ROOT / "relbert_ds" / "resources" / "data" / "classification" / "BLESS"
    directory.mkdir(parents=True)
    for split, per_relation in (("train", 8), ("validation", 3), ("test", 4)):
        taken: dict[str, int] = {}
        lines = []
        for line in (source / f"{split}.jsonl").read_text().splitlines():
            relation = json.loads(line)["relation"]
            if taken.get(relation, 0) < per_relation:
                taken[relation] = taken.get(relation, 0) + 1
                lines.append(line)
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A model folder as Trainer.export writes it (weights, tokenizer, relbert_config, training
    record, README from the trainer's model_card call) and a real evaluator results JSON for it."""
    import torch

    from relbert_ds import RelationEncoder, evaluation
    from relbert_ds.evaluation import runner
    from relbert_ds.evaluation.classification import ProbeOptions
    from relbert_ds.evaluation.runner import EncodingOptions
    from tests.tiny_models import make_tiny_bert

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("export")
    encoder = RelationEncoder.from_pretrained(make_tiny_bert(base / "backbone"), template="d")
    folder = base / "best_model"
    encoder.save_pretrained(folder)
    run = RunConfig()
    run.train.max_steps, run.train.lr = 40, 1e-4
    ds = json.loads(json.dumps(EMBEDDED_DS_CONFIG))
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=16)
    ds["bf16"]["enabled"], ds["fp16"]["enabled"] = False, False
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}  # resolve_optimizer writes it
    validation = {"epoch": 3, "optimizer_step": 40, "analogy": {"semeval2012": 0.4556962, "sat": 0.3243243},
                  "analogy_mean": 0.39, "metric": "analogy_mean", "score": 0.39, "seconds": 1.0}
    best = {"epoch": 3, "metric": "analogy_mean", "score": 0.39}
    record = {**run.to_dict(), "deepspeed": ds, "world_size": 2, "relations_per_step": 16, "optimizer_steps": 40,
              "schedule": "10 linear warm-up steps then constant (relbert-ds)", "validation_results": validation,
              "best": best}
    (folder / "relbert_ds_training.json").write_text(json.dumps(record))
    (folder / "README.md").write_text(build_card(record, template=encoder.template))  # as the trainer does
    # The evaluator's own flow and writer, on the bundled SAT (valid, test, full) and a tiny probe.
    tasks = evaluation.prepare_tasks(analogy=["sat"], classification=[str(_tiny_classification_set(base / "cls"))],
                                 split=["validation", "test"])
    encoder.name = str(folder)
    results = {"model": runner.evaluate_tasks(encoder, tasks, encoding=EncodingOptions(batch_size=128),
                                              probe=ProbeOptions(max_iter=50))}
    baseline = RelationEncoder.from_pretrained(make_tiny_bert(base / "baseline", seed=1), template="d")
    baseline.name = "tiny-baseline"
    results["baseline"] = runner.evaluate_tasks(baseline, tasks, encoding=EncodingOptions(batch_size=128),
                                                probe=ProbeOptions(max_iter=50))
    results_path = base / "results.json"
    evaluation.write_outputs(results, {"created_utc": "2026-11-30T00:00:00+00:00", "world_size": 1},
                             output=results_path)
    return folder, results_path


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _push(*argv: str) -> int:
    return push_cli.main(list(argv))


# --------------------------------------------------------------------------- tests


def test_push_uploads_every_file_and_a_full_card(hub, export, capsys):
    folder, results_path = export
    before = _hashes(folder)
    code = _push(str(folder), "someone/relbert-tiny", "--results", str(results_path), "--token", TOKEN,
                 "--endpoint", hub.url)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{hub.url}/someone/relbert-tiny" in out
    assert _hashes(folder) == before  # the local model is untouched

    assert list(hub.repos) == ["someone/relbert-tiny"] and not hub.repos["someone/relbert-tiny"]["private"]
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "main"
    received = hub.repos["someone/relbert-tiny"]["files"]
    local = {rel: digest for rel, digest in before.items() if rel != "README.md"}
    assert {rel: hashlib.sha256(data).hexdigest() for rel, data in received.items() if rel != "README.md"} == local
    assert {"config.json", "model.safetensors", "relbert_ds_training.json"} <= set(local)

    card = received["README.md"].decode()
    assert hub.validated_yaml == [card]  # the hub library had the metadata validated before uploading
    assert card != (folder / "README.md").read_text()
    meta = _front_matter(card)
    for key in ("library_name", "base_model", "license", "datasets", "tags", "pipeline_tag", "model-index"):
        assert key in meta, key
    assert meta["pipeline_tag"] == "feature-extraction" and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"  # RunConfig's default backbone
    assert meta["datasets"] == ["relbert/semeval2012_relational_similarity"]
    assert "relbert" in meta["tags"]

    # model-index: every metric of the evaluated model, with the value the results JSON holds.
    document = json.loads(results_path.read_text())
    model = document["models"]["model"]
    want = {}
    for task, section in (("analogy", model["analogy"]), ("classification", model["classification"])):
        for entry in section.values():
            for metric in ("accuracy", "f1_macro", "f1_micro"):
                if metric in entry:
                    want[(task, entry["dataset"], entry["split"], metric)] = entry[metric]
    assert {k[:3] for k in want} >= {("analogy", "sat", "validation"), ("analogy", "sat", "test"),
                                     ("analogy", "sat", "full")}
    assert any(k[0] == "classification" and k[3] == "f1_macro" for k in want)
    [index] = meta["model-index"]
    assert index["name"] == "relbert-tiny"
    got = {}
    for result in index["results"]:
        assert {"type", "name"} <= set(result["task"]) and {"type", "name", "split"} <= set(result["dataset"])
        task = {"analogy-questions": "analogy",
                "lexical-relation-classification": "classification"}[result["task"]["type"]]
        for metric in result["metrics"]:
            got[(task, result["dataset"]["name"], result["dataset"]["split"], metric["type"])] = metric["value"]
    assert got == want
    # huggingface_hub's own parser reads the same model-index (its schema: task, dataset, metrics)
    from huggingface_hub import ModelCard

    parsed = ModelCard(card).data
    assert parsed.base_model == meta["base_model"] and parsed.model_name == "relbert-tiny"
    assert sorted(r.metric_value for r in parsed.eval_results) == sorted(want.values())
    assert {r.dataset_type for r in parsed.eval_results} == {"relbert/analogy_questions", "cls"}
    # the flat metrics the evaluator writes agree too (its own keys, n_tied being a count, not a score)
    flat = {k: v for k, v in model["metrics"].items() if not k.endswith("/n_tied")}
    assert sorted(flat.values()) == sorted(want.values())

    # the body: recipe, DeepSpeed config, results with the baseline column, both ways to load, citation
    body = card.split("---\n", 2)[2]
    assert "| global batch | 16 relation groups per optimizer step over 2 rank(s), 2 micro step(s) each" in body
    assert "| steps | 40 optimizer steps at export" in body and "nce (temperature 0.05)" in body
    assert '| optimizer | `{"params": {"lr": 0.0001, "weight_decay": 0.0}, "type": "AdamW"}` |' in body
    assert "| schedule | 10 linear warm-up steps then constant (relbert-ds) |" in body
    assert "I wasn’t aware of this relationship" in body and "average_no_mask" in body
    assert json.dumps(json.loads(json.dumps({k: v for k, v in json.loads(
        received["relbert_ds_training.json"])["deepspeed"].items()})), indent=2, sort_keys=True) in body
    sat_test = model["analogy"]["sat/test"]["accuracy"]
    baseline_sat_test = document["models"]["baseline"]["analogy"]["sat/test"]["accuracy"]
    assert f"| analogy | sat | test | accuracy | 337 | {100 * sat_test:.1f} | {100 * baseline_sat_test:.1f} |" in body
    assert "RelationEncoder.from_pretrained('someone/relbert-tiny')" in body
    assert "from relbert import RelBERT" in body and "RelBERT('someone/relbert-tiny')" in body
    assert CITATION in body and "@inproceedings{ushio-etal-2021-distilling" in body


def test_card_without_results_uses_the_exports_validation(hub, export, capsys):
    folder, _ = export
    assert _push(str(folder), "relbert-val", "--private", "--token", TOKEN, "--endpoint", hub.url) == 0
    capsys.readouterr()
    assert list(hub.repos) == ["standin-user/relbert-val"]  # a bare name goes under the token's user
    assert hub.repos["standin-user/relbert-val"]["private"] is True
    card = hub.repos["standin-user/relbert-val"]["files"]["README.md"].decode()
    assert "RelationEncoder.from_pretrained('standin-user/relbert-val')" in card
    meta = _front_matter(card)
    [index] = meta["model-index"]
    got = {(r["dataset"]["name"], r["dataset"]["split"], m["type"]): m["value"]
           for r in index["results"] for m in r["metrics"]}
    assert got == {("semeval2012", "validation", "accuracy"): 0.4556962, ("sat", "validation", "accuracy"): 0.3243243}


def test_trainer_card_has_the_metadata(export):
    folder, _ = export
    card = (folder / "README.md").read_text()  # written as the trainer writes it
    meta = _front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["pipeline_tag"] == "feature-extraction"
    assert [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]] == [0.4556962, 0.3243243]
    assert "## Training recipe" in card and "## Citation" in card


def _one_error_line(err: str) -> str:
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err  # nothing but the error
    return assert_one_error_line(err, "; fix: ")


def test_existing_repo_is_one_error_line_unless_exist_ok(hub, export, capsys):
    folder, _ = export
    before = _hashes(folder)
    hub.repos["someone/taken"] = {"private": False, "files": {"old.txt": b"x"}}
    assert _push(str(folder), "someone/taken", "--token", TOKEN, "--endpoint", hub.url) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "already exists" in line and "--exist_ok" in line
    assert hub.commits == [] and _hashes(folder) == before
    assert _push(str(folder), "someone/taken", "--exist_ok", "--token", TOKEN, "--endpoint", hub.url) == 0
    capsys.readouterr()
    assert len(hub.commits) == 1 and "old.txt" in hub.repos["someone/taken"]["files"]


def test_unreachable_hub_is_one_error_line(export, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder, _ = export
    before = _hashes(folder)
    with StandInHub() as closed:  # a port that was just listening and is now closed
        url = closed.url
    assert _push(str(folder), "someone/x", "--token", TOKEN, "--endpoint", url) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot reach the hub" in line and url in line
    assert _hashes(folder) == before


def test_rejected_token_and_offline_mode_are_one_line(hub, export, monkeypatch, capsys):
    folder, _ = export
    assert _push(str(folder), "someone/x", "--token", "hf_wrong", "--endpoint", hub.url) == 2
    assert "refused the token" in _one_error_line(capsys.readouterr().err)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _push(str(folder), "someone/x", "--token", TOKEN, "--endpoint", hub.url) == 2
    assert "HF_HUB_OFFLINE" in _one_error_line(capsys.readouterr().err)
    assert hub.repos == {}


def test_not_an_export_and_bad_results_are_one_line(hub, export, tmp_path, capsys):
    folder, _ = export
    assert _push(str(tmp_path), "someone/x", "--token", TOKEN, "--endpoint", hub.url) == 2
    assert "is not a model exported by relbert-ds" in _one_error_line(capsys.readouterr().err)
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"benchmark": "something else"}))
    assert _push(str(folder), "someone/x", "--results", str(bad), "--token", TOKEN, "--endpoint", hub.url) == 2
    assert "not a relbert-ds-evaluate results file" in _one_error_line(capsys.readouterr().err)
    assert _push(str(folder), "bad//id", "--token", TOKEN, "--endpoint", hub.url) == 2
    assert "not a hub repo id" in _one_error_line(capsys.readouterr().err)
    assert hub.repos == {}


def test_console_script_without_token_is_one_error_line(hub, export, tmp_path):
    """The real command in a fresh process: no HF_TOKEN, no saved login -> one line, exit 2."""
    folder, _ = export
    before = _hashes(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "relbert_ds.push", str(folder), "someone/x", "--endpoint", hub.url],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert hub.repos == {} and _hashes(folder) == before


def test_dry_run_prints_the_card(export, capsys):
    folder, results_path = export
    assert _push(str(folder), "someone/relbert-tiny", "--results", str(results_path), "--dry_run") == 0
    out, err = capsys.readouterr()
    assert _front_matter(out)["model-index"][0]["name"] == "relbert-tiny"
    assert "model.safetensors" in err and "README.md" in err


@pytest.mark.slow
def test_a_real_training_run_plots_and_pushes(hub, tiny_bert, tmp_path, capsys):
    """One rank trains a tiny BERT for 2 steps; its history draws and its export uploads unchanged."""
    from relbert_ds.cli import plot as plot_cli
    from tests.launch import check, run

    out = tmp_path / "run"
    check(run([sys.executable, "launchers/train.py", "--model", tiny_bert, "--output_dir", str(out), "--max_steps", "2",
               "--relations_per_rank", "4", "--positives_per_relation", "4", "--negatives_per_relation", "4",
               "--analogy", "semeval2012", "--batch_size", "128", "--lr", "1e-4", "--no-projector"], timeout=900))
    assert plot_cli.main([str(out)]) == 0
    assert len(list((out / "figures").glob("*.png"))) == 5
    folder = out / "model"
    before = _hashes(folder)
    assert _push(str(folder), "someone/real", "--token", TOKEN, "--endpoint", hub.url) == 0, capsys.readouterr().err
    received = hub.repos["someone/real"]["files"]
    assert {k: hashlib.sha256(v).hexdigest() for k, v in received.items() if k != "README.md"} == \
        {k: v for k, v in before.items() if k != "README.md"}
    assert _hashes(folder) == before
    training = json.loads((folder / "relbert_ds_training.json").read_text())
    meta = _front_matter(received["README.md"].decode())
    [result] = [r for r in meta["model-index"][0]["results"] if r["dataset"]["name"] == "semeval2012"]
    assert result["metrics"][0]["value"] == training["validation_results"]["analogy"]["semeval2012"]
    assert "base_model" not in meta  # a local backbone folder has no hub id to link to
