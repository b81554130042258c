"""A stand-in for gpu_check's worker script (tests put it in ``gpu_check.WORKER_SCRIPT``): ``inspect``
and ``make_model`` run the real worker; every other job appends its pid and that of a child it starts in
a session of its own (as torchrun starts ranks) to ``$STANDIN_PIDS``, then hangs."""
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

REAL = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"

if __name__ == "__main__":
    mode = sys.argv[sys.argv.index("--worker") + 1]
    if mode in ("inspect", "make_model"):
        sys.argv[0] = str(REAL)
        runpy.run_path(str(REAL), run_name="__main__")
    else:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        with open(os.environ["STANDIN_PIDS"], "a") as f:
            f.write(f"{os.getpid()}\n{child.pid}\n")
        time.sleep(600)
