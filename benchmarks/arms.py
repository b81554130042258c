"""The arms the benchmarks race, and the score they are raced on.

- ``ours``: relbert-ds's trainer through its public API (``build_ours``, ``ours_step``);
- ``public``: the public RelBERT trainer's scheme re-implemented on our encoder (``PublicScheme``,
  ``PublicTrainer``, described below);
- ``bare``: plain PyTorch on the same encoder (``Bare``);
- the score: SemEval-2012 validation analogy accuracy through the trainer's validation path
  (``semeval_questions``, ``accuracy``).

The real public trainer runs in a venv of its own: ``benchmarks/public_relbert.py``.

The public scheme (relbert 2.0.x, ``Trainer._train_nce`` with ``augment_negative_by_positive``):
What it does, as in the public code:
- all pairs are tokenized once up front, **padded to max_length** (``encode_plus(...,
  padding='max_length')``, 64 tokens), so every step encodes 64 positions per prompt;
- one relation per optimizer step; relations in a random order each epoch (79 steps/epoch);
- the relation's positives (at most ``num_positive`` = 10, a random subset) and up to
  ``num_negative`` = 400 negatives drawn from the relation's own negatives **plus the positives
  of every other relation**; all of them are encoded in the step's forward (in chunks of
  ``batch`` = 32 prompts, with autograd), so every negative costs a forward and a backward;
- ``loss_nce``: ``sum_{i,j in P} -log(e^{c_ij/t} / (sum_k e^{c_ik/t} + e^{c_ij/t} + 1e-5))``
  with cosine ``c``, ``t`` = 0.05, the diagonal ``i = j`` included, summed (not averaged);
- torch AdamW (weight decay 0), ``lr_warmup`` = 10 linear warm-up steps then constant, no
  gradient clipping, a single process.

The encoder (backbone + pooling) is relbert-ds's ``RelationEncoder`` so that both schemes run
the same network; pooling is a mean where the public code sums, which cosine does not see.
``padding="longest"`` is offered to separate the cost of the scheme from that of padding.
"""
from __future__ import annotations

import argparse
import random
from typing import Any, Optional, Sequence

import torch

Pair = tuple[str, str]


class PublicScheme:
    """The batch plan and token cache of the public per-relation trainer."""

    def __init__(self, dataset: Any, encoder: Any, num_positive: int = 10, num_negative: int = 400, seed: int = 0,
                 padding: str = "max_length") -> None:
        if padding not in ("max_length", "longest"):
            raise ValueError("padding must be max_length (the public code) or longest")
        self.dataset = dataset
        self.encoder = encoder
        self.num_positive = num_positive
        self.num_negative = num_negative
        self.padding = padding
        self.rng = random.Random(seed)
        self.positives: dict[str, list[Pair]] = {g.relation_type: [tuple(p) for p in g.positives]
                                                 for g in dataset.relations}
        # augment_negative_by_positive: own negatives + every other relation's positives.
        self.negatives: dict[str, list[Pair]] = {}
        for g in dataset.relations:
            others = [p for r, ps in self.positives.items() if r != g.relation_type for p in ps]
            self.negatives[g.relation_type] = [tuple(p) for p in g.negatives] + others
        self.relation_types = sorted(self.positives)
        self._cache: dict[Pair, tuple[list[int], list[int]]] = {}
        self._tokenize_all()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.relation_types)

    def _tokenize_all(self) -> None:
        """Tokenize every pair once (the public trainer does this before its first step)."""
        pairs = list(dict.fromkeys(p for r in self.relation_types for p in self.positives[r] + self.negatives[r]))
        enc = self.encoder
        kwargs: dict[str, Any] = {"truncation": True, "max_length": enc.max_length}
        if self.padding == "max_length":
            kwargs["padding"] = "max_length"
        batch = enc.tokenizer(enc.prompts(pairs), return_token_type_ids=False, **kwargs)
        for pair, ids, mask in zip(pairs, batch["input_ids"], batch["attention_mask"]):
            self._cache[pair] = (ids, mask)

    def epoch_order(self) -> list[str]:
        order = list(self.relation_types)
        self.rng.shuffle(order)
        return order

    def step_pairs(self, relation: str) -> tuple[list[Pair], list[Pair]]:
        """The positives and negatives one step of ``relation`` encodes (random subsets)."""
        pos, neg = list(self.positives[relation]), list(self.negatives[relation])
        if len(pos) > self.num_positive:
            self.rng.shuffle(pos)
            pos = pos[:self.num_positive]
        if len(neg) > self.num_negative:
            self.rng.shuffle(neg)
            neg = neg[:self.num_negative]
        return pos, neg

    def tensors(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """Token tensors of ``pairs`` from the cache (padded to the longest of them if not already)."""
        rows = [self._cache[p] for p in pairs]
        width = max(len(ids) for ids, _ in rows)
        pad = self.encoder.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row_ids, row_mask) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            mask[i, :len(row_mask)] = torch.tensor(row_mask)
        return {"input_ids": ids, "attention_mask": mask}


def public_nce_loss(positive: torch.Tensor, negative: torch.Tensor, temperature: float = 0.05,
                    eps: float = 1e-5) -> torch.Tensor:
    """relbert's ``loss_nce`` (not InfoLOOB, no classification head), written as it is there."""
    cos = torch.nn.CosineSimilarity(dim=2)
    logit_n = torch.exp(cos(positive.unsqueeze(1), negative.unsqueeze(0)) / temperature)  # (P, N)
    deno_n = torch.sum(logit_n, dim=-1)  # (P,)
    logit_p = torch.exp(cos(positive.unsqueeze(1), positive.unsqueeze(0)) / temperature)  # (P, P)
    return torch.sum(-torch.log(logit_p / (deno_n.unsqueeze(-1) + logit_p + eps)))


class PublicTrainer:
    """One model, its AdamW and the public warm-up schedule, stepping one relation at a time."""

    def __init__(self, encoder: Any, scheme: PublicScheme, lr: float = 2e-5, warmup: int = 10,
                 temperature: float = 0.05, chunk: int = 32) -> None:
        self.encoder = encoder
        self.scheme = scheme
        self.temperature = temperature
        self.chunk = chunk
        self.optimizer = torch.optim.AdamW([{"params": list(encoder.parameters()), "weight_decay": 0}], lr=lr)

        def lr_lambda(step: int) -> float:
            step += 1
            return step / max(1, warmup) if step < warmup else 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.encoder.train()

    def _embed(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward in chunks of ``chunk`` prompts with autograd (the public ``to_embedding``)."""
        n = tokens["input_ids"].shape[0]
        parts = [self.encoder(tokens["input_ids"][s:s + self.chunk], tokens["attention_mask"][s:s + self.chunk])
                 for s in range(0, n, self.chunk)]
        return torch.cat(parts)

    def step(self, relation: str, pairs: Optional[tuple[list[Pair], list[Pair]]] = None) -> dict[str, Any]:
        """One optimizer step on ``relation``; returns loss and what was encoded."""
        pos, neg = pairs or self.scheme.step_pairs(relation)
        self.optimizer.zero_grad()
        tp, tn = self.scheme.tensors(pos), self.scheme.tensors(neg)
        loss = public_nce_loss(self._embed(tp), self._embed(tn), self.temperature)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()), "positives": len(pos), "negatives": len(neg),
                "sequences": len(pos) + len(neg),
                "real_tokens": int(tp["attention_mask"].sum() + tn["attention_mask"].sum()),
                "padded_tokens": int(tp["input_ids"].numel() + tn["input_ids"].numel()),
                # what the loss scores: every positive anchor i against every negative k
                "anchor_negative_pairs": len(pos) * len(neg), "anchor_positive_terms": len(pos) * len(pos)}


# --------------------------------------------------------------------------- ours and bare


def measurement_run(deepspeed_config: Optional[str], model: str, output_dir: str, **fields: Any) -> Any:
    """The RunConfig of a measured run: the given DeepSpeed JSON, backbone and folder (overwritten), no
    validation sets, TensorBoard, projector or best-model export (the benchmarks score and time the model
    themselves). ``fields`` set more options by name (``lr=1e-4``, ``relations_per_step=8``), each in the
    config section that has it; an unknown name is an error."""
    from relbert_ds.training.config import RunConfig

    run = RunConfig()
    run.deepspeed_config = deepspeed_config
    run.model.model = model
    run.train.output_dir, run.train.overwrite = output_dir, True
    run.train.tensorboard, run.train.export_best = False, False
    run.validation.metric, run.validation.analogy, run.validation.projector = "none", [], False
    sections = (run.model, run.data, run.train, run.validation)
    for name, value in fields.items():
        section = next((s for s in sections if name in vars(s)), None)
        if section is None:
            raise TypeError(f"no run option {name!r}")
        setattr(section, name, value)
    return run


def build_ours(args: argparse.Namespace, run_dir: str) -> Any:
    """relbert-ds's trainer through its public API: ``Trainer(run).prepare()`` joins the (one-rank)
    job, checks and loads everything and builds the DeepSpeed engine, as ``fit`` does before its loop."""
    from relbert_ds.training.trainer import Trainer

    run = measurement_run(args.deepspeed_config, args.model, run_dir, relations_per_step=args.relations_per_step,
                          positives_per_relation=args.positives_per_relation,
                          negatives_per_relation=args.negatives_per_relation, lr=args.lr,
                          # epochs sizes the LR schedule (the benchmarks stop by themselves); no peak_tflops:
                          # prepare() measures this CPU's peak
                          epochs=getattr(args, "epochs", None), threads=args.threads,
                          peak_tflops=getattr(args, "peak_tflops", None))
    return Trainer(run).prepare()


def ours_step(trainer: Any) -> dict[str, Any]:
    """The trainer's next optimizer step (``train_step``: its micro steps, backward, DeepSpeed's
    step, the history line); pairs and real tokens as the step's record counted them."""
    record = trainer.train_step()
    seconds = record["step_seconds"]
    return {"pairs": round(record["pairs_per_s"] * seconds), "real_tokens": round(record["tokens_per_s"] * seconds),
            "loss": record["loss"], "epoch": record["epoch"]}


def upcoming_pairs(trainer: Any, steps: int) -> list[list[tuple[str, str]]]:
    """The pairs of the trainer's next ``steps`` optimizer steps (all their micro steps), read from
    its sampler's plan, which depends on nothing but the position (the bare arm replays them)."""
    sampler, done = trainer.sampler, trainer.progress.optimizer_steps
    out = []
    for k in range(steps):
        epoch, step = divmod(done + k, sampler.steps_per_epoch)
        out.append([p for micro in range(sampler.accumulation) for p in sampler.local_batch(epoch, step, micro).pairs])
    return out


class Bare:
    """Plain PyTorch: same encoder class and weights, mean of the pooled output, torch AdamW."""

    def __init__(self, model: str, lr: float) -> None:
        import torch

        from relbert_ds import RelationEncoder

        self.torch = torch
        self.encoder = RelationEncoder.from_pretrained(model, warn_untrained=False)
        self.encoder.train()
        self.optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0)

    def step(self, tokens: dict[str, Any]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.encoder(tokens["input_ids"], tokens["attention_mask"]).mean()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


# --------------------------------------------------------------------------- the score


def semeval_questions() -> Any:
    from relbert_ds.data import load_relation_dataset
    from relbert_ds.data.derived import relation_analogy_questions

    return relation_analogy_questions(load_relation_dataset("semeval2012", "validation"))


def accuracy(encoder: Any, questions: Any) -> float:
    """SemEval-2012 validation analogy accuracy of ``encoder`` (the trainer's validation path)."""
    from relbert_ds.evaluation.validation import analogy_accuracies

    return float(analogy_accuracies(encoder, [questions])[questions.name])
