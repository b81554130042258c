"""benchmarks/gpu_check.py without a GPU: one line, exit 0, nothing written (the committed results
of a GPU run must not be replaced by an empty file). Chosen behaviour, documented in the script:
no JSON at all rather than a JSON that says "skipped"."""
import sys

from tests.launch import rank_env, run


def test_no_gpu_prints_one_line_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    work = tmp_path / "work"
    result = run([sys.executable, "benchmarks/gpu_check.py", "--output", str(out), "--work_dir", str(work)],
                 timeout=300, env=rank_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("gpu_check: no CUDA GPU visible") and "nothing written" in lines[0]
    assert "CUDA_VISIBLE_DEVICES=)" in lines[0]  # says why: the variable hid every device
    assert "Traceback" not in result.stderr
    assert not out.exists() and not work.exists()


def test_no_gpu_quick_mode_is_the_same_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--output", str(out)], timeout=300,
                 env=rank_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("gpu_check: no CUDA GPU visible") and not out.exists()
