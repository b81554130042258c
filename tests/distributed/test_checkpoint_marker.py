"""The checkpoint completeness marker lists every file at the size the rank that wrote it saw.

Rank 0 used to list the folder and stat every rank's shards itself; on a network file system it may
see a file another node wrote at a stale size, and the good checkpoint is refused as truncated at
the next ``--resume``. Now each rank reports the files it wrote (gathered with the save's one
exchange) and rank 0 looks up only what it wrote itself.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from relbert_ds.training import checkpointing
from relbert_ds.training.run_directory import MARKER
from tests.launch import check, rank_env, run, torchrun_cmd

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import deepspeed
    import torch

    from relbert_ds.parallel import distributed
    from relbert_ds.training import checkpointing

    from relbert_ds.cli.common import exit_process
    from relbert_ds.training.engine import skip_cpu_shm_op

    distributed.init_distributed(backend="gloo")
    skip_cpu_shm_op()  # else DeepSpeed JIT-compiles its CPU shared-memory op (40-70 s) on a fresh machine
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": int(sys.argv[2])},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(torch.randn(2, 16)).square().mean()
    engine.backward(loss)
    engine.step()
    checkpointing.save_checkpoint(engine, Path(sys.argv[1]), 1, {"step": 1}, {"model": "mlp"}, keep_last=2)
    distributed.shutdown()
    exit_process(0)  # the CLI's exit: torch's C++ teardown aborts about 1 exit in 8 of 2-rank CPU jobs
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_marker_of_a_two_rank_checkpoint_is_complete_and_correct(stage, tmp_path):
    """Real ranks, real DeepSpeed save (ZeRO-2: rank 0 writes the model states, each rank its
    optimizer shard; ZeRO-3: each rank its model and optimizer shards): every file is in the
    marker at its size on disk, and the checkpoint is accepted for --resume."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_dir = tmp_path / "run"
    check(run(torchrun_cmd(str(script), str(run_dir), str(stage)), timeout=600,
              env=rank_env(DS_ACCELERATOR="cpu")))
    tag_dir = run_dir / "checkpoints" / "global_step1"
    files = json.loads((tag_dir / MARKER).read_text())["files"]
    on_disk = {p.name: p.stat().st_size for p in tag_dir.iterdir() if p.is_file() and p.name != MARKER}
    assert files == on_disk
    assert {f"rng_state_rank{r}.pt" for r in (0, 1)} <= set(files)
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
    if stage == 3:
        assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(files)
    else:
        assert "mp_rank_00_model_states.pt" in files
    assert checkpointing.find_checkpoint(run_dir, "latest") == tag_dir


def test_marker_files_take_the_sizes_the_writing_ranks_reported(tmp_path):
    """Rank 0 sees rank 1's shard at a stale size (as over NFS): the marker keeps the size rank 1
    reported; only a file no rank reported (a write outside the checkpoint engine) is looked up on
    disk; the marker itself is not listed."""
    tag_dir = tmp_path / "global_step4"
    tag_dir.mkdir()
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"m" * 5)
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 10)  # rank 0's stale view
    (tag_dir / "extra.bin").write_bytes(b"s" * 7)
    (tag_dir / MARKER).write_text("{}")
    (tag_dir / "offloaded_tensors").mkdir()
    reported = [{"mp_rank_00_model_states.pt": 5, "rng_state_rank0.pt": 3},
                {"zero_pp_rank_1_mp_rank_00_optim_states.pt": 20, "rng_state_rank1.pt": 3}]
    assert checkpointing.marker_files(tag_dir, reported) == {
        "mp_rank_00_model_states.pt": 5, "rng_state_rank0.pt": 3, "rng_state_rank1.pt": 3,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt": 20, "extra.bin": 7}

