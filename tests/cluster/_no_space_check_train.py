"""launchers/train.py without the free-space check before each checkpoint (the disk-fault tests).

With the check, a checkpoint that cannot fit is refused before anything is written; without it,
the write itself runs into the full file system, which is the path under test: DeepSpeed's save
fails part-way on one or both ranks and the ranks must still agree and clean up.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if __name__ == "__main__":
    from relbert_ds.training import checkpointing

    checkpointing.check_free_space = lambda *args, **kwargs: None
    from relbert_ds.cli.train import run

    run()
