#!/usr/bin/env python
"""Evaluate relation embeddings, sharded over the ranks of the job (see relbert_ds/cli/evaluate.py).

    python launchers/evaluate.py --model all-MiniLM-L6-v2
    torchrun --standalone --nproc_per_node 2 launchers/evaluate.py --model <folder> --baseline all-MiniLM-L6-v2
    deepspeed --num_gpus 2 --master_port 29611 launchers/evaluate.py --model <folder> --output results.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relbert_ds.cli.evaluate import run  # noqa: E402

if __name__ == "__main__":
    run()
