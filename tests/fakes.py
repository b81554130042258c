"""Stand-ins the tests share (one module): a vector function and an encoder without a model, a
DeepSpeed engine that only writes checkpoint files, the Hugging Face datasets hub in memory, and a
writer of relation datasets in the relbert schema."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def hashed_vector(pair, dim: int = 8) -> np.ndarray:
    """A fixed pseudo-random vector per pair (independent of batch and call order)."""
    seed = int.from_bytes(hashlib.sha256("\t".join(pair).encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class FakeEncoder(torch.nn.Module):
    """What encode_sharded needs of a RelationEncoder, with a vector function instead of a model."""

    def __init__(self, vector_fn=hashed_vector, dim: int = 8):
        super().__init__()
        self.vector_fn, self.dim = vector_fn, dim
        self.calls: list[list] = []
        self.name, self.template, self.pooling, self.max_length = "fake", "<subj> : <obj>", "average", 64

    @property
    def hidden_size(self) -> int:
        return self.dim

    def prompt_lengths(self, pairs):
        return [len(h) + len(t) for h, t in pairs]

    def embed(self, pairs):
        assert not self.training, "encode_sharded must put the encoder in eval mode"
        assert not torch.is_grad_enabled()
        self.calls.append(list(pairs))
        return torch.from_numpy(np.stack([self.vector_fn(p) for p in pairs]))


class FakeEngine:
    """What save_checkpoint uses of a DeepSpeed engine: a checkpoint engine that writes files."""

    class _CheckpointEngine:
        def __init__(self, fail_with=None):
            self.fail_with = fail_with

        def save(self, state_dict, path):
            torch.save(state_dict, path)
            if self.fail_with is not None:
                raise self.fail_with

    def __init__(self, fail_with=None):
        self.module = torch.nn.Linear(4, 4)
        self.checkpoint_engine = self._CheckpointEngine(fail_with)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        self.checkpoint_engine.save({"module": self.module.state_dict(), **client_state},
                                    str(folder / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer": {}}, str(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


class FakeHub:
    """Stands in for datasets.load_dataset: serves in-memory splits, records calls."""

    def __init__(self, splits: dict[str, list[dict]]) -> None:
        self.splits = splits
        self.calls: list[tuple[str, Optional[str], Optional[str]]] = []

    def __call__(self, repo: str, config: Optional[str] = None, split: Optional[str] = None, **_: Any) -> Any:
        import datasets

        self.calls.append((repo, config, split))
        if split is None:
            return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in self.splits.items()})
        if split not in self.splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(self.splits)}.')
        return datasets.Dataset.from_list(self.splits[split])


def write_relations(folder: Path, n_relations: int, *, positives: int = 3, negatives: int = 2, tag: str = "g",
                    parents: int = 0, splits: tuple[str, ...] = ("train", "validation")) -> Path:
    """A folder of ``<split>.jsonl`` files in the relbert schema: ``n_relations`` relations named
    ``<tag><r>``, with distinct pairs (and ``parent`` ``r % parents`` when ``parents``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        with open(folder / f"{split}.jsonl", "w") as handle:
            for r in range(n_relations):
                word = f"{tag}{split[0]}"  # distinct words per source and split
                record = {"relation_type": f"{tag}{r}",
                          "positives": [[f"{word}h{r}n{i}", f"{word}t{r}n{i}"] for i in range(positives)],
                          "negatives": [[f"{word}x{r}n{i}", f"{word}y{r}n{i}"] for i in range(negatives)]}
                if parents:
                    record["parent"] = str(r % parents)
                handle.write(json.dumps(record) + "\n")
    return folder
