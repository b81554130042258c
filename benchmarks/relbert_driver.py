#!/usr/bin/env python
"""The driver of the real relbert-train, run by the relbert venv's python (never by relbert-ds's: it
imports relbert, not relbert_ds).

It calls relbert's own ``relbert-train`` entry point (``relbert.relbert_cl.train.main``) with the command
line the parent gives. Hooks around three relbert functions pause it after its tokenization and after
every optimizer step (its scheduler step) and wait for the next command on stdin (``step``, ``save DIR``,
``stop``), so the benchmarks can interleave it with the other arms and time each unit of its work.
Nothing inside a step is altered. Protocol: one JSON line per event on the original stdout.

    <relbert venv>/bin/python benchmarks/relbert_driver.py --threads 2 -- <relbert-train options>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence


def _drive(train_args: Sequence[str], threads: int) -> None:
    """Run relbert-train, pausing after tokenization and after each optimizer step for a command.

    Runs under the relbert venv's python. Protocol: one JSON line per event on the original
    stdout (everything else printed goes to stderr); commands on stdin.
    """
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # relbert's and transformers' prints must not reach the protocol channel
    import torch

    torch.set_num_threads(threads)
    from importlib import metadata

    import relbert.trainer as relbert_trainer
    from relbert.relbert_cl import train as relbert_train_cli

    started = time.perf_counter()
    state: dict[str, Any] = {"step": 0, "resumed": 0.0, "loss": None, "sequences": 0, "real_tokens": 0,
                             "padded_tokens": 0, "trainer": None}

    def emit(event: str, **fields: Any) -> None:
        channel.write(json.dumps({"event": event, **fields}) + "\n")

    def wait_for_step() -> None:
        """Serve commands until 'step'; then the clock of the next step starts."""
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "step":
                state.update(resumed=time.perf_counter(), sequences=0, real_tokens=0, padded_tokens=0)
                return
            if command == "save":
                t = time.perf_counter()
                state["trainer"].model.save(arg)
                emit("saved", path=arg, seconds=time.perf_counter() - t)
            elif command == "stop":
                break
            else:
                emit("error", message=f"unknown command {command!r}")
        channel.flush()
        os._exit(0)  # stop here, mid-training; nothing of relbert's needs tearing down

    original_init = relbert_trainer.Trainer.__init__
    original_process = relbert_trainer.Trainer.process_data
    original_loss = relbert_trainer.loss_nce

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        state["trainer"] = self
        scheduler_step = self.scheduler.step
        to_embedding = self.model.to_embedding

        def counted_embedding(encode: Any, batch_size: Any = None) -> Any:
            state["sequences"] += int(encode["input_ids"].shape[0])
            state["real_tokens"] += int(encode["attention_mask"].sum())
            state["padded_tokens"] += int(encode["input_ids"].numel())
            return to_embedding(encode, batch_size=batch_size)

        def step_then_pause(*a: Any, **k: Any) -> Any:
            out = scheduler_step(*a, **k)  # relbert's optimizer step is done: that is one step
            state["step"] += 1
            emit("step", step=state["step"], seconds=time.perf_counter() - state["resumed"], loss=state["loss"],
                 lr=self.optimizer.param_groups[0]["lr"], sequences=state["sequences"],
                 real_tokens=state["real_tokens"], padded_tokens=state["padded_tokens"])
            wait_for_step()
            return out

        self.model.to_embedding = counted_embedding
        self.scheduler.step = step_then_pause

    def process_data(self: Any, split: str) -> Any:
        out = original_process(self, split)
        emit("ready", setup_s=time.perf_counter() - started, relbert=metadata.version("relbert"),
             torch_threads=torch.get_num_threads(), config=self.config)
        wait_for_step()
        return out

    def loss_nce(*a: Any, **k: Any) -> Any:
        loss = original_loss(*a, **k)
        state["loss"] = float(loss.detach())
        return loss

    relbert_trainer.Trainer.__init__ = init
    relbert_trainer.Trainer.process_data = process_data
    relbert_trainer.loss_nce = loss_nce
    sys.argv = ["relbert-train", *train_args]
    relbert_train_cli.main()
    emit("finished", steps=state["step"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads of relbert's process")
    p.add_argument("train_args", nargs="*", help="relbert-train's options (after --)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _drive(args.train_args, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
