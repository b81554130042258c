"""relbert_ds.progress: plain lines in a log file (no carriage returns), a bar on a terminal; and the
evaluator and the trainer reporting through it."""
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from relbert_ds.progress import Progress
from tests.launch import REPO, rank_env

LINE = re.compile(r"^encode: ([\d,]+)/1,000 pairs \(([\d.]+)%\), [\d,.]+ pairs/s, about .+ left$")


def test_plain_lines_in_a_log_file():
    out = io.StringIO()  # not a TTY: a log file, a pipe
    progress = Progress(1000, "encode", unit="pair", stream=out, every_s=0.0)
    for _ in range(10):
        progress.update(100)
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    counts = [int(LINE.match(line).group(1).replace(",", "")) for line in lines[:-1]]
    assert counts == list(range(100, 1001, 100))
    assert re.match(r"^encode: 1,000/1,000 pairs done in \d+ s$", lines[-1])


def test_lines_are_spaced_by_the_interval_and_disabled_ranks_say_nothing():
    out = io.StringIO()
    progress = Progress(1000, "encode", unit="pair", stream=out, every_s=3600)
    progress.update(500)
    assert out.getvalue() == ""  # the interval has not passed
    silent = io.StringIO()
    other_rank = Progress(1000, "encode", unit="pair", stream=silent, every_s=0.0, enabled=False)
    other_rank.update(500)
    other_rank.close()
    assert silent.getvalue() == ""


def test_a_terminal_gets_a_bar():
    leader, follower = pty.openpty()
    # a terminal of 100 x 24 (a fresh pty has 0 columns, and tqdm draws nothing into 0 columns)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    code = ("import sys, time; from relbert_ds.progress import Progress\n"
            "p = Progress(50, 'encode', unit='pair', mininterval=0)\n"
            "for _ in range(50): p.update(1)\n"
            "p.close()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL,
                            cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "50/50" in text and "done in" not in text  # tqdm's bar, not plain lines


def test_the_evaluator_reports_progress_in_a_log_file(tiny_bert, tmp_path):
    log = tmp_path / "evaluate.log"
    with open(log, "w") as stderr:
        result = subprocess.run([sys.executable, "launchers/evaluate.py", "--model", tiny_bert, "--analogy", "sat",
                                 "--classification", "none", "--output", str(tmp_path / "r.json")],
                                cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=stderr, timeout=300,
                                env=rank_env(RELBERT_DS_PROGRESS_EVERY="0"))
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    pairs = json.loads((tmp_path / "r.json").read_text())["models"]["model"]["n_pairs"]
    lines = [line for line in text.splitlines() if line.startswith("encode (1 rank): ")]
    assert len(lines) >= 3, text[-3000:]
    assert re.match(rf"^encode \(1 rank\): [\d,]+/{pairs:,} pairs \([\d.]+%\), [\d,.]+ pairs/s", lines[0])
    assert re.match(rf"^encode \(1 rank\): {pairs:,}/{pairs:,} pairs done in \d+ s$", lines[-1])


def test_the_trainer_reports_progress_in_a_log_file(tiny_bert, tmp_path):
    from tests.launch import deepspeed_cmd, run

    result = run(deepspeed_cmd("launchers/train.py", "--model", tiny_bert, "--output_dir", str(tmp_path / "run"),
                               "--deepspeed_config", "ds_configs/zero2.json", "--relations_per_step", "4",
                               "--positives_per_relation", "2", "--negatives_per_relation", "1", "--metric", "none",
                               "--analogy", "--no-projector", "--max_steps", "40"),
                 timeout=300, env=rank_env(RELBERT_DS_PROGRESS_EVERY="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: ")]
    assert "\r" not in result.stderr
    assert re.match(r"^train: 1/40 steps \(2\.5%\), [\d,.]+ steps/s, about .+ left, loss [\d.]+, pairs/s", lines[0])
    assert re.match(r"^train: 40/40 steps done in \d+ s \(loss [\d.]+", lines[-1])
