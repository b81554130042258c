#!/usr/bin/env python
"""Train RelBERT with DeepSpeed: a thin launcher around relbert_ds.cli.train.

    deepspeed --num_gpus N launchers/train.py --deepspeed_config ds_configs/zero2.json [options]
    torchrun --nproc_per_node N launchers/train.py ...
    mpirun -np N python -m mpi4py launchers/train.py ...
    srun python launchers/train.py ...
    python launchers/train.py                      # one rank, embedded defaults
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from relbert_ds.cli.train import run  # noqa: E402

if __name__ == "__main__":
    run()
