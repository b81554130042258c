"""Every rank must plan from the same inputs: two real ranks started by hand, each in its own "node"
folder, given the same relative paths to per-node copies of the data and the model; a copy that differs on
rank 1 stops the job before step 1 with one line naming rank 1, its host and the input."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from relbert_ds.training.same_inputs import first_difference
from tests.assertions import assert_one_error_line
from tests.launch import REPO, free_port

pytestmark = pytest.mark.slow
SEMEVAL = REPO / "relbert_ds" / "resources" / "data" / "semeval2012"


def nodes(tmp_path, tiny_bert):
    """Two node folders with identical copies of the training data and the model."""
    out = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        shutil.copytree(SEMEVAL, node / "data")
        shutil.copytree(tiny_bert, node / "model")
        out.append(node)
    return out


def launch(nodes_, run_dir):
    port = str(free_port())
    procs = []
    for rank, node in enumerate(nodes_):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "RELBERT_DS_CONNECT_TIMEOUT": "60"}
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "launchers" / "train.py"), "--model", "model", "--train_data", "data",
             "--output_dir", str(run_dir), "--max_steps", "1", "--metric", "none", "--analogy", "--no-projector",
             "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")],
            cwd=str(node), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], "".join(err for _, err in results)


@pytest.mark.parametrize("differ", ["data", "tokenizer"])
def test_a_node_copy_that_differs_stops_the_job_before_step_1(tiny_bert, tmp_path, differ):
    node0, node1 = nodes(tmp_path, tiny_bert)
    if differ == "data":  # an older copy: the last relation missing
        lines = (node1 / "data" / "train.jsonl").read_text().splitlines()
        (node1 / "data" / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")
        fragment = "read a different training data (data"
    else:  # another tokenizer: one vocabulary entry changed
        tokenizer = node1 / "model" / "tokenizer.json"
        text = tokenizer.read_text()
        assert '"the":' in text
        tokenizer.write_text(text.replace('"the":', '"thee":', 1))
        fragment = "read a different model file model/tokenizer.json"
    codes, stderr = launch([node0, node1], tmp_path / "run")
    assert codes == [2, 2], stderr[-3000:]
    line = assert_one_error_line(stderr, "rank 1 on host", fragment, "than rank 0 on host",
                                 "fix: make that node's copy identical")
    assert "sha256" in line
    assert not (tmp_path / "run" / "history.jsonl").exists()  # stopped before step 1


def test_identical_inputs_pass_and_the_report_names_the_first_difference():
    same = {"training data (x)": "aa", "model file m/vocab.txt": "bb"}
    ranks = [{"rank": r, "host": f"n{r}", "inputs": dict(same)} for r in range(4)]
    assert first_difference(ranks) is None
    ranks[2]["inputs"]["model file m/vocab.txt"] = "cc"
    del ranks[3]["inputs"]["training data (x)"]
    report = first_difference(ranks)
    assert report.startswith("rank 2 on host n2 read a different model file m/vocab.txt than rank 0 on host n0 "
                             "(sha256 cc vs sha256 bb)")


def test_the_evaluator_compares_its_inputs_too(tiny_bert, tmp_path):
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        shutil.copytree(REPO / "relbert_ds" / "resources" / "data" / "analogy" / "sat", node / "sat")
        if rank == 1:  # this node's copy gives the first question another answer
            test = node / "sat" / "test.jsonl"
            lines = test.read_text().splitlines()
            first = json.loads(lines[0])
            first["answer"] = (first["answer"] + 1) % len(first["choice"])
            test.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "launchers" / "evaluate.py"), "--model", tiny_bert, "--analogy", "./sat",
             "--classification", "none", "--output", str(tmp_path / "r.json")],
            cwd=str(node), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    stderr = "".join(p.communicate(timeout=300)[1] for p in procs)
    assert [p.returncode for p in procs] == [2, 2], stderr[-3000:]
    assert_one_error_line(stderr, "rank 1 on host", "read a different analogy set", "than rank 0")
    assert not (tmp_path / "r.json").exists()  # stopped before scoring anything
