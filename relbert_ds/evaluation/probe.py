"""The classification probe's grid in torch: every grid point trained together, scikit-learn's rules.

What it reproduces of ``sklearn.neural_network.MLPClassifier`` (its defaults, which the paper's
probe uses): one relu hidden layer; softmax output with cross-entropy; L2 penalty ``alpha=1e-4``
on the weights (not the biases), added to each mini-batch loss as ``0.5 * alpha * ||W||^2 / n``;
mini-batches of ``min(200, n)`` rows in a new random order every epoch, the last one smaller;
Adam with sklearn's update (``lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, betas
0.9/0.999, eps 1e-8, constant learning rate); Glorot-uniform initialisation of weights *and*
biases with bound ``sqrt(6 / (fan_in + fan_out))``; at most ``max_iter`` epochs, stopping once
the epoch's training loss has not improved by ``tol`` for more than ``n_iter_no_change``
epochs in a row. Not reproduced: sklearn's random stream (torch draws its own numbers, so a
torch fit and an sklearn fit with the same seed are two samples of the same procedure, not the
same numbers) and sklearn's single logistic output unit for two classes (here always softmax).

How the grid trains together: the grid points share the features and, per epoch, the order of
the rows, so the hidden layers of all of them are one matrix (stored transposed, ``(sum of hidden
sizes, D)``: one GEMM per mini-batch instead of nine) and the output layers are one block-diagonal
matrix (each grid point's hidden units only reach its own outputs). Adam runs as fused kernels over
each grid point's rows, one call per learning rate (the points sharing it together; the L2 penalty's
gradient added as the kernel's weight decay), one pass over memory instead of nine. Each
grid point stops on its own: once stopped, its rows are taken out of the packed matrices, so it
costs nothing after that and its weights stay as they were.

Successive halving (``prune_at``, the evaluator's fast protocol): after the given epochs the
points still running are ranked by their best validation macro F1 so far and only the best third
goes on; on this CPU the matrix products set the time, so cutting grid-point epochs is what makes
the probe faster (benchmarks/probe_schedule.py replays schedules on recorded curves).

Randomness: grid point ``i``'s initial weights come from a generator seeded with
``(seed, i)`` and the epoch orders from one seeded with ``seed``, both on the CPU, so a grid
point gets the same start and the same batches whether it is trained alone or with the others,
on the CPU or on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

ALPHA = 1e-4
MAX_BATCH = 200
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
TOL = 1e-4
N_ITER_NO_CHANGE = 10
_FUSED_ADAM: dict[str, bool] = {}  # device type -> whether torch's private fused Adam kernel runs there


def fused_adam_works(device: torch.device) -> bool:
    """Whether ``torch._fused_adam_`` runs on ``device``'s type (tried once on one element, then remembered)."""
    kind = torch.device(device).type
    if kind not in _FUSED_ADAM:
        try:
            one = [torch.zeros(1, device=device) for _ in range(4)]
            torch._fused_adam_([one[0]], [one[1]], [one[2]], [one[3]], [], [torch.ones((), device=device)], lr=1e-3,
                               beta1=BETA1, beta2=BETA2, weight_decay=0.0, eps=EPS, amsgrad=False, maximize=False)
            _FUSED_ADAM[kind] = True
        except (AttributeError, RuntimeError, TypeError, NotImplementedError):
            _FUSED_ADAM[kind] = False
    return _FUSED_ADAM[kind]


@dataclass(frozen=True)
class GridPoint:
    """One configuration of the probe: hidden layer width and Adam learning rate."""

    hidden: int
    learning_rate: float


@dataclass
class FittedGrid:
    """The trained grid: per grid point its final weights, epochs run, curves and why it stopped."""

    points: list[GridPoint]
    weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # (w1, b1, w2, b2) each
    n_iter: list[int]
    loss_curves: list[list[float]]
    validation_curves: list[list[float]] = field(default_factory=list)  # macro F1 per epoch (with validation)
    monitor_curves: dict[str, list[list[float]]] = field(default_factory=dict)  # the same for each monitored set
    stopped_by: list[str] = field(default_factory=list)  # "loss", "max_iter" or "pruned"

    def predict(self, x: np.ndarray, device: Optional[torch.device] = None,
                points: Optional[Sequence[int]] = None) -> np.ndarray:
        """(G, n) int64 class indices of each grid point (or of those of ``points``, in that order) for the
        rows of ``x``."""
        chosen = list(range(len(self.points))) if points is None else list(points)
        if len(x) == 0:
            return np.zeros((len(chosen), 0), dtype=np.int64)
        device = device or self.weights[0][0].device
        xt = torch.as_tensor(x, dtype=torch.float32, device=device)
        out = []
        with torch.no_grad():
            for w1, b1, w2, b2 in (self.weights[i] for i in chosen):
                logits = torch.relu(xt @ w1 + b1) @ w2 + b2
                out.append(logits.argmax(dim=1).cpu().numpy())
        return np.stack(out).astype(np.int64)


def glorot_uniform(generator: torch.Generator, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's initialisation of one layer: weights and bias uniform in +-sqrt(6 / (fan_in + fan_out))."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    weight = (torch.rand(fan_in, fan_out, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    bias = (torch.rand(fan_out, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return weight.float(), bias.float()


def initial_weights(point_index: int, point: GridPoint, n_features: int, n_classes: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid point ``point_index``'s starting (w1, b1, w2, b2), on the CPU, from ``(seed, point_index)``."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(point_index))
    w1, b1 = glorot_uniform(generator, n_features, point.hidden)
    w2, b2 = glorot_uniform(generator, point.hidden, n_classes)
    return w1, b1, w2, b2


class _Packed:
    """The trainable tensors of the active grid points side by side, with Adam's state and gradients.

    ``w1t`` is the transposed hidden layer ``(sum of hidden sizes, D)``: grid point ``g`` owns the
    rows ``rows[g]``, so each point's tensors are contiguous slices that the fused Adam call of its
    learning rate updates. The output layer is stored transposed too, ``w2t``
    ``(G * k, sum of hidden sizes)``, block diagonal (``mask``): each point's outputs only see its own
    hidden units. Transposed, the three thin products with it run 2-4x faster on this CPU's BLAS than
    with ``(hidden, G * k)``, and each point's rows of it are contiguous for Adam.
    """

    def __init__(self, weights: Sequence[Sequence[torch.Tensor]], moments: Sequence[Sequence[torch.Tensor]],
                 points: Sequence[GridPoint], n_classes: int) -> None:
        self.widths = [w[0].shape[1] for w in weights]
        self.k, self.groups = n_classes, len(weights)
        self.rates = [p.learning_rate for p in points]
        dim, total = weights[0][0].shape[0], sum(self.widths)
        device = weights[0][0].device
        shapes = [(total, dim), (total,), (self.groups * self.k, total), (self.groups * self.k,)]
        self.param, self.m, self.v, self.grad = ([torch.zeros(s, device=device) for s in shapes] for _ in range(4))
        self.rows = []
        row = 0
        for width in self.widths:
            self.rows.append(slice(row, row + width))
            row += width
        for target, items in ((self.param, weights), (self.m, [mo[:4] for mo in moments]),
                              (self.v, [mo[4:] for mo in moments])):
            for g, (w1, b1, w2, b2) in enumerate(items):
                for dst, src in zip(self._slices(target, g), (w1.t(), b1, w2.t(), b2)):
                    dst.copy_(src)
        self.mask = torch.zeros(shapes[2], device=device)
        for g in range(self.groups):
            self.mask[g * self.k:(g + 1) * self.k, self.rows[g]] = 1.0
        self.step = torch.zeros((), device=device)  # the fused kernel's step count (it only reads it)
        self.minus_one = torch.full((), -1.0, device=device)  # the target's -1 in softmax's gradient
        self.param_t = [self.param[0].t(), self.param[1], self.param[2].t(), self.param[3]]  # (D, H) and (H, G*k)
        self._activations: dict[int, tuple[torch.Tensor, ...]] = {}
        # Each point's views, made once (slicing them per mini-batch cost more than their Adam): per point,
        # per buffer (param, grad, m, v), its weights (w1t rows, w2t rows, flattened: Adam is elementwise and
        # the loss's squared norm takes them as vectors) and its biases (b1, b2 entries).
        self.views = []
        for g in range(self.groups):
            parts = [self._point(t, g) for t in (self.param, self.grad, self.m, self.v)]
            self.views.append(([[w1t.reshape(-1), w2t.reshape(-1)] for w1t, _, w2t, _ in parts],
                               [[b1, b2] for _, b1, _, b2 in parts]))
        self.weight_rows = [weights[0] for weights, _ in self.views]  # each point's (w1t rows, w2t rows) of param
        # Points sharing a learning rate share one fused call for their weights and one for their biases (the
        # kernel is elementwise, tensor by tensor: grouping changes no number; 6 calls instead of 18 for the
        # whole grid, ~50 us each).
        self.adam_groups: list[tuple[float, list[list[torch.Tensor]], list[list[torch.Tensor]]]] = []
        for rate in dict.fromkeys(self.rates):
            members = [self.views[g] for g in range(self.groups) if self.rates[g] == rate]
            self.adam_groups.append((rate, [sum((w[b] for w, _ in members), []) for b in range(4)],
                                     [sum((bias[b] for _, bias in members), []) for b in range(4)]))

    def activations(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Reused buffers for a mini-batch of ``rows`` rows: hidden units, logits, the hidden gradient and its
        transposed view, softmax's -1 at the target per point, and ``rows`` as a tensor (dividing by a
        tensor skips wrapping a Python number; the same division). Fresh ones
        each mini-batch cost more than the elementwise work on them (the allocator hands out new pages)."""
        if rows not in self._activations:
            total, device = sum(self.widths), self.param[0].device
            hidden, grad = torch.empty(rows, total, device=device), torch.empty(rows, total, device=device)
            self._activations[rows] = (hidden, torch.empty(rows, self.groups * self.k, device=device), grad,
                                       grad.t(), self.minus_one.expand(rows, self.groups, 1),
                                       torch.full((), float(rows), device=device))
        return self._activations[rows]

    def _slices(self, tensors: Sequence[torch.Tensor], g: int) -> list[torch.Tensor]:
        """Grid point ``g``'s parts of (w1t, b1, w2t, b2)-shaped ``tensors`` (its block of w2t is strided)."""
        w1t, b1, w2t, b2 = self._point(tensors, g)
        return [w1t, b1, w2t[:, self.rows[g]], b2]

    def _point(self, tensors: Sequence[torch.Tensor], g: int) -> list[torch.Tensor]:
        """Grid point ``g``'s rows of (w1t, b1, w2t, b2)-shaped ``tensors``: contiguous views for Adam (its w2t
        rows span every point's hidden units; the others' are masked to zero gradient, so Adam leaves them at 0)."""
        rows, outputs = self.rows[g], slice(g * self.k, (g + 1) * self.k)
        return [tensors[0][rows], tensors[1][rows], tensors[2][outputs], tensors[3][outputs]]

    def adam(self, step: int, decay: float) -> None:
        """sklearn's Adam update of every point: ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``,
        after the L2 penalty's gradient ``decay * W`` (``alpha / batch rows``) is added to the weights' gradients
        (not the biases').

        torch's fused kernel computes ``lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps')``, the same
        update when ``eps' = eps / sqrt(1 - b2^t)``, and adds the penalty as its (non-decoupled) weight decay:
        one pass over the buffers instead of nine. Where the kernel is missing (it is private to torch) or
        refuses the device, the same update runs unfused.
        """
        if not fused_adam_works(self.param[0].device):
            self.adam_unfused(step, decay)
            return
        eps = EPS / math.sqrt(1 - BETA2 ** step)
        self.step.fill_(float(step))
        for rate, weights, biases in self.adam_groups:
            for tensors, weight_decay in ((weights, decay), (biases, 0.0)):
                torch._fused_adam_(*tensors, [], [self.step] * len(tensors[0]), lr=rate, beta1=BETA1, beta2=BETA2,
                                   weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)

    def adam_unfused(self, step: int, decay: float) -> None:
        """The update of :meth:`adam` in plain tensor operations."""
        correction = math.sqrt(1 - BETA2 ** step) / (1 - BETA1 ** step)
        for rate, (weights, biases) in zip(self.rates, self.views):
            for (params, grads, ms, vs), weight_decay in ((weights, decay), (biases, 0.0)):
                for p, grad, m, v in zip(params, grads, ms, vs):
                    if weight_decay:
                        grad = grad.add(p, alpha=weight_decay)
                    m.mul_(BETA1).add_(grad, alpha=1 - BETA1)
                    v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
                    p.addcdiv_(m, v.sqrt().add_(EPS), value=-rate * correction)

    def _copy_out(self, tensors: Sequence[torch.Tensor], g: int) -> list[torch.Tensor]:
        """Grid point ``g``'s part of (w1t, b1, w2t, b2)-shaped ``tensors`` as its own (w1, b1, w2, b2) copies."""
        w1t, b1, w2t, b2 = self._slices(tensors, g)
        return [w1t.t().contiguous(), b1.clone(), w2t.t().contiguous(), b2.clone()]

    def unpack(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Per point ([w1, b1, w2, b2], its 8 Adam moment tensors), copied out of the buffers."""
        return [(self._copy_out(self.param, g), self._copy_out(self.m, g) + self._copy_out(self.v, g))
                for g in range(self.groups)]

    def macro_f1(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Macro F1 of every packed point on ``(x, y)`` (sklearn's: over the labels in gold or predictions)."""
        w1t, b1, w2t, b2 = self.param
        with torch.no_grad():
            logits = torch.addmm(b2, torch.relu(torch.addmm(b1, x, w1t.t())), w2t.t())
            pred = logits.view(len(x), self.groups, self.k).argmax(2)
        return macro_f1_columns(y, pred, self.k)


def macro_f1_columns(y: torch.Tensor, pred: torch.Tensor, k: int) -> list[float]:
    """Macro F1 of each column of ``pred`` (n, G) against ``y`` (n,), over the labels present in gold or
    that column's predictions (``classification_metrics``'s definition)."""
    groups = pred.shape[1]
    cells = (torch.arange(groups, device=y.device).view(1, groups) * k + y.view(-1, 1)) * k + pred
    confusion = torch.bincount(cells.reshape(-1), minlength=groups * k * k).view(groups, k, k).double()
    tp = confusion.diagonal(dim1=1, dim2=2)
    gold, predicted = confusion.sum(2), confusion.sum(1)
    present = (gold + predicted) > 0
    f1 = torch.where(present, 2 * tp / (gold + predicted).clamp_min(1), torch.zeros_like(tp))
    return (f1.sum(1) / present.sum(1).clamp_min(1)).tolist()


@dataclass
class _PointState:
    """One grid point while the grid trains: its weights and Adam moments (between packings), epochs run,
    curves, and sklearn's stopping state."""

    weights: list[torch.Tensor]
    moments: list[torch.Tensor]
    n_iter: int = 0
    stopped_by: str = ""  # "loss", "max_iter" or "pruned" once it stopped
    losses: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    watched: dict[str, list[float]] = field(default_factory=dict)
    best_loss: float = math.inf
    stale: int = 0

    def record(self, loss: float, max_iter: int, tol: float, n_iter_no_change: int) -> bool:
        """Count one epoch with training loss ``loss``; True when sklearn's rule (no improvement by more
        than ``tol`` for more than ``n_iter_no_change`` epochs running) or ``max_iter`` stops the point."""
        self.n_iter += 1
        self.losses.append(loss)
        self.stale = self.stale + 1 if loss > self.best_loss - tol else 0
        self.best_loss = min(self.best_loss, loss)
        if self.stale > n_iter_no_change:
            self.stopped_by = "loss"
        elif self.n_iter >= max_iter:
            self.stopped_by = "max_iter"
        return bool(self.stopped_by)


class _Epochs:
    """The mini-batch plumbing of one packing of the active points: every epoch's row order, the reused
    batch buffer and the slots each step writes its loss terms into (made once per packing, not per
    mini-batch: each view costs as much as a small kernel)."""

    def __init__(self, packed: _Packed, xt: torch.Tensor, yt: torch.Tensor, batch: int,
                 order_rng: torch.Generator) -> None:
        n, dim = xt.shape
        groups = packed.groups
        self.packed, self.xt, self.yt, self.batch, self.order_rng = packed, xt, yt, batch, order_rng
        self.ye = torch.empty_like(yt)  # the epoch's labels in order
        xb = xt.new_empty(batch, dim)  # one mini-batch's rows
        # Every mini-batch's labels, spread over the points, in the epoch's order (``ye`` is refilled each epoch).
        self.targets = self.ye.view(n, 1, 1).expand(n, groups, 1).split(batch)
        self.rows_in = {len(t): xb[:len(t)] for t in self.targets}
        # Per mini-batch, where its step writes: each point's summed log-likelihood, and its two squared weight
        # norms (||W1||^2, ||W2||^2), float32 as computed; every slot is overwritten each epoch.
        n_batches = -(-n // batch)
        self.parts = torch.empty(3, n_batches, groups, device=xt.device)
        self.slots = [(self.parts[0, b], [(self.parts[1, b, g], self.parts[2, b, g]) for g in range(groups)])
                      for b in range(n_batches)]

    def run(self, alpha: float, step: int) -> tuple[list[float], int]:
        """One epoch of every packed point; (each point's training loss, the Adam step count after it)."""
        n = self.xt.shape[0]
        order = torch.randperm(n, generator=self.order_rng).to(self.xt.device)
        torch.index_select(self.yt, 0, order, out=self.ye)
        for rows, target, (cross_entropy, squares) in zip(order.split(self.batch), self.targets, self.slots):
            step += 1
            # The batch's rows gathered into one reused buffer that both products then read from cache
            # (cheaper than gathering the whole epoch at once, which streams it through memory twice).
            xs = self.rows_in[len(rows)]
            torch.index_select(self.xt, 0, rows, out=xs)
            _step(self.packed, xs, target, alpha, step, cross_entropy, squares)
        # The epoch's loss adds the batches' float32 terms up in float64.
        sums = torch.stack((self.parts[0], self.parts[1] + self.parts[2])).double().sum(dim=1)
        return ((-sums[0] + 0.5 * alpha * sums[1]) / n).tolist(), step


def fit_grid(x: np.ndarray, y: np.ndarray, points: Sequence[GridPoint], n_classes: int, max_iter: int = 200,
             seed: int = 0, device: Optional[torch.device] = None, alpha: float = ALPHA, tol: float = TOL,
             n_iter_no_change: int = N_ITER_NO_CHANGE, batch_size: int = MAX_BATCH,
             validation: Optional[tuple[np.ndarray, np.ndarray]] = None, prune_at: Sequence[int] = (),
             keep_fraction: float = 1 / 3,
             monitor: Optional[dict[str, tuple[np.ndarray, np.ndarray]]] = None) -> FittedGrid:
    """Train every grid point of ``points`` on ``(x, y)`` at once (see the module docstring).

    Args:
        x: (n, D) float32 features. y: (n,) int64 class indices in ``[0, n_classes)``.
        device: where to train (default CPU). Results are deterministic for a device and seed.
        validation: ``(x_val, y_val)``; its macro F1 is recorded after every epoch (with ``prune_at``, after
            every epoch up to the last cut).
        prune_at: successive halving: after each of these epochs the grid points still in the running
            are cut to the best ``keep_fraction`` (at least one) by their best validation macro F1 so far
            (ties: grid order); a cut point stops there with its weights of that epoch. The points kept
            train on under the same rule, from the same start on the same batches, as without pruning
            (a smaller pack sums its products in another order: equal to rounding, which the stopping
            rule can turn into a few epochs' difference over a long run). Needs ``validation``.
        monitor: more ``{name: (x, y)}`` sets whose macro F1 is recorded per epoch, for study only (the
            test split's curve, say); they never influence training.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")

    def on_device(features: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32), device=device),
                torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device))

    xv, yv = on_device(*validation) if validation is not None and len(validation[0]) else (None, None)
    if prune_at and xv is None:
        raise ValueError("prune_at needs validation data")
    n, dim = x.shape
    k = int(n_classes)
    xt, yt = on_device(x, y)
    watched = {name: on_device(mx, my) for name, (mx, my) in (monitor or {}).items()}
    state = []
    for i, p in enumerate(points):
        weights = [t.to(device) for t in initial_weights(i, p, dim, k, seed)]
        state.append(_PointState(weights, [torch.zeros_like(t) for t in weights] * 2,
                                 watched={name: [] for name in watched}))
    running = set(range(len(points)))  # not cut by pruning
    cuts = sorted({int(e) for e in prune_at if 0 < int(e) < max_iter})
    active = list(range(len(points)))
    order_rng = torch.Generator().manual_seed(int(seed))
    step = 0
    while active:
        packed = _Packed([state[i].weights for i in active], [state[i].moments for i in active],
                         [points[i] for i in active], k)
        epochs = _Epochs(packed, xt, yt, min(batch_size, n), order_rng)
        stopped: list[int] = []
        # Train epochs with this packing until one of its points stops.
        while not stopped:
            epoch = state[active[0]].n_iter  # every active point has run the same number of epochs
            losses, step = epochs.run(alpha, step)
            # With pruning, validation is scored until the last cut (nothing reads it after that).
            scores = packed.macro_f1(xv, yv) if xv is not None and (cuts or not prune_at) else []
            for name, (mx, my) in watched.items():
                for i, score in zip(active, packed.macro_f1(mx, my)):
                    state[i].watched[name].append(score)
            for slot, i in enumerate(active):
                if scores:
                    state[i].validation.append(scores[slot])
                if state[i].record(losses[slot], max_iter, tol, n_iter_no_change):
                    stopped.append(i)
            if cuts and epoch + 1 == cuts[0]:
                cuts.pop(0)
                # Everyone still in the running competes, including points that already stopped on their own.
                ranked = sorted(running, key=lambda i: (-max(state[i].validation), i))
                for i in ranked[max(1, math.ceil(len(ranked) * keep_fraction)):]:
                    running.discard(i)
                    if i in active and i not in stopped:
                        stopped.append(i)
                        state[i].stopped_by = "pruned"
        for i, (w, mo) in zip(active, packed.unpack()):
            state[i].weights, state[i].moments = w, mo
        active = [i for i in active if i not in stopped]
    return FittedGrid(points=list(points), weights=[tuple(s.weights) for s in state], n_iter=[s.n_iter for s in state],
                      loss_curves=[s.losses for s in state], validation_curves=[s.validation for s in state],
                      monitor_curves={name: [s.watched[name] for s in state] for name in watched},
                      stopped_by=[s.stopped_by for s in state])


def _step(packed: _Packed, xb: torch.Tensor, target: torch.Tensor, alpha: float, step: int,
          cross_entropy: torch.Tensor, squares: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One mini-batch of every packed grid point (``target``: its (nb, G, 1) class indices, the labels
    repeated for each point). Writes each point's summed log-likelihood of the batch into ``cross_entropy``
    ((G,)) and its squared weight norms ``||W1||^2``, ``||W2||^2`` into the 0-d tensors ``squares[g]``:
    sklearn's batch loss times the batch size is ``-cross_entropy + 0.5 * alpha * (||W1||^2 + ||W2||^2)``."""
    nb, groups, k = xb.shape[0], packed.groups, packed.k
    w1, b1, w2, b2 = packed.param_t
    g_w1t, g_b1, g_w2t, g_b2 = packed.grad
    a, logits, da, da_t, minus_one, rows = packed.activations(nb)
    torch.addmm(b1, xb, w1, out=a)
    a.clamp_min_(0.0)  # relu in place: a > 0 exactly where its input was, which is all its gradient needs
    torch.addmm(b2, a, w2, out=logits)
    logp = torch.log_softmax(logits.view(nb, groups, k), dim=2)
    torch.sum(logp.gather(2, target).squeeze(2), dim=0, out=cross_entropy)
    for (w1_rows, w2_rows), (square1, square2) in zip(packed.weight_rows, squares):
        torch.dot(w1_rows, w1_rows, out=square1)
        torch.dot(w2_rows, w2_rows, out=square2)
    # Gradients of the mean loss (sklearn divides every gradient by the batch size).
    delta = logp.exp_()
    delta.scatter_add_(2, target, minus_one)
    delta = delta.view(nb, groups * k).div_(rows)
    # The L2 penalty's part of the weights' gradients, alpha * W / nb, is added by Adam (plain products here:
    # a product that also scales and adds W costs an extra pass over it).
    torch.mm(delta.t(), a, out=g_w2t)
    if groups > 1:  # one point's block is all of w2t
        g_w2t.mul_(packed.mask)
    torch.sum(delta, dim=0, out=g_b2)
    torch.mm(delta, packed.param[2], out=da)
    torch.ops.aten.threshold_backward.grad_input(da, a, 0.0, grad_input=da)  # relu's gradient, in place
    torch.mm(da_t, xb, out=g_w1t)
    torch.sum(da, dim=0, out=g_b1)
    packed.adam(step, alpha / nb)
