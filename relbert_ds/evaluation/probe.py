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
the rows, so the hidden layers of all of them are one matrix ``W1`` of ``(D, sum of hidden
sizes)`` (one GEMM per mini-batch instead of nine) and the output layers are one block-diagonal
matrix (each grid point's hidden units only reach its own outputs). Learning rates are
per-column. Each grid point stops on its own: once converged, its columns are taken out of
the packed matrices, so it costs nothing after that and its weights stay as they were.

Randomness: grid point ``i``'s initial weights come from a generator seeded with
``(seed, i)`` and the epoch orders from one seeded with ``seed``, both on the CPU, so a grid
point gets the same start and the same batches whether it is trained alone or with the others,
on the CPU or on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

ALPHA = 1e-4
MAX_BATCH = 200
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
TOL = 1e-4
N_ITER_NO_CHANGE = 10


@dataclass(frozen=True)
class GridPoint:
    """One configuration of the probe: hidden layer width and Adam learning rate."""

    hidden: int
    learning_rate: float


@dataclass
class FittedGrid:
    """The trained grid: per grid point its weights, epochs run and loss curve."""

    points: list[GridPoint]
    weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # (w1, b1, w2, b2) each
    n_iter: list[int]
    loss_curves: list[list[float]]

    def predict(self, x: np.ndarray, device: Optional[torch.device] = None) -> np.ndarray:
        """(G, n) int64 class indices of each grid point for the rows of ``x``."""
        if len(x) == 0:
            return np.zeros((len(self.points), 0), dtype=np.int64)
        device = device or self.weights[0][0].device
        xt = torch.as_tensor(x, dtype=torch.float32, device=device)
        out = []
        with torch.no_grad():
            for w1, b1, w2, b2 in self.weights:
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
    """The trainable tensors of the active grid points side by side in one flat buffer, with Adam's state.

    One flat buffer (and one for each Adam moment, the gradient and a scratch area) lets the
    optimizer update every tensor of every grid point in a few whole-buffer operations; ``w1``,
    ``b1``, ``w2`` and ``b2`` are views into it. ``w2`` is block diagonal (``mask``).
    """

    def __init__(self, weights: Sequence[Sequence[torch.Tensor]], moments: Sequence[Sequence[torch.Tensor]],
                 points: Sequence[GridPoint], n_classes: int) -> None:
        self.widths = [w[0].shape[1] for w in weights]
        self.k, self.groups = n_classes, len(weights)
        dim, total = weights[0][0].shape[0], sum(self.widths)
        device = weights[0][0].device
        self.shapes = [(dim, total), (total,), (total, self.groups * self.k), (self.groups * self.k,)]
        size = sum(math.prod(shape) for shape in self.shapes)
        self.param, self.m, self.v, self.grad, self.scratch = (torch.zeros(size, device=device) for _ in range(5))
        for buffer, items in ((self.param, weights), (self.m, [mo[:4] for mo in moments]),
                              (self.v, [mo[4:] for mo in moments])):
            for index, (view, parts) in enumerate(zip(self.views(buffer), zip(*items))):
                self._place(view, parts, index)
        self.mask = torch.zeros(self.shapes[2], device=device)
        self._place(self.mask, [torch.ones(w, self.k) for w in self.widths], index=2)
        # Per-element learning rate, as a divisor folded into Adam's denominator.
        rates = self.views(torch.zeros(size))
        self._place(rates[0], [torch.full((dim, w), p.learning_rate) for w, p in zip(self.widths, points)], index=0)
        self._place(rates[1], [torch.full((w,), p.learning_rate) for w, p in zip(self.widths, points)], index=1)
        self._place(rates[2], [torch.full((w, self.k), p.learning_rate) for w, p in zip(self.widths, points)], index=2)
        self._place(rates[3], [torch.full((self.k,), p.learning_rate) for p in points], index=3)
        self.inverse_rate = (1.0 / torch.cat([r.reshape(-1) for r in rates]).clamp_min(1e-30)).to(device)
        self.group_of_col = torch.repeat_interleave(torch.arange(self.groups), torch.tensor(self.widths)).to(device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` cut into the (w1, b1, w2, b2) shapes."""
        out, offset = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[offset:offset + n].view(shape))
            offset += n
        return out

    def _place(self, view: torch.Tensor, parts: Sequence[torch.Tensor], index: int) -> None:
        """Write per-point tensors into packed view ``index`` (0 w1, 1 b1, 2 w2, 3 b2): hidden units side
        by side, each point's output block on w2's diagonal."""
        row = 0
        for g, (part, width) in enumerate(zip(parts, self.widths)):
            cols = slice(g * self.k, (g + 1) * self.k)
            if index == 0:
                view[:, row:row + width] = part
            elif index == 1:
                view[row:row + width] = part
            elif index == 2:
                view[row:row + width, cols] = part
            else:
                view[cols] = part
            row += width

    def unpack(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Per point ([w1, b1, w2, b2], its 8 Adam moment tensors), copied out of the buffers."""
        out, row = [], 0
        per_buffer = [self.views(b) for b in (self.param, self.m, self.v)]
        for g, width in enumerate(self.widths):
            cols = slice(g * self.k, (g + 1) * self.k)

            def take(views: list[torch.Tensor]) -> list[torch.Tensor]:
                w1, b1, w2, b2 = views
                return [w1[:, row:row + width].clone(), b1[row:row + width].clone(),
                        w2[row:row + width, cols].clone(), b2[cols].clone()]

            out.append((take(per_buffer[0]), take(per_buffer[1]) + take(per_buffer[2])))
            row += width
        return out


def fit_grid(x: np.ndarray, y: np.ndarray, points: Sequence[GridPoint], n_classes: int, max_iter: int = 200,
             seed: int = 0, device: Optional[torch.device] = None, alpha: float = ALPHA, tol: float = TOL,
             n_iter_no_change: int = N_ITER_NO_CHANGE, batch_size: int = MAX_BATCH) -> FittedGrid:
    """Train every grid point of ``points`` on ``(x, y)`` at once (see the module docstring).

    Args:
        x: (n, D) float32 features. y: (n,) int64 class indices in ``[0, n_classes)``.
        device: where to train (default CPU). Results are deterministic for a device and seed.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    n, dim = x.shape
    k = int(n_classes)
    batch = min(batch_size, n)
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
    weights = [[t.to(device) for t in initial_weights(i, p, dim, k, seed)] for i, p in enumerate(points)]
    moments = [[torch.zeros_like(t) for t in w] * 2 for w in weights]
    n_iter = [0] * len(points)
    curves: list[list[float]] = [[] for _ in points]
    best = [math.inf] * len(points)
    stale = [0] * len(points)
    active = list(range(len(points)))
    order_rng = torch.Generator().manual_seed(int(seed))
    step = 0
    while active:
        packed = _Packed([weights[i] for i in active], [moments[i] for i in active], [points[i] for i in active], k)
        converged: list[int] = []
        # Train epochs with this packing until one of its points converges (or all reach max_iter).
        while not converged:
            epoch = n_iter[active[0]]  # every active point has run the same number of epochs
            order = torch.randperm(n, generator=order_rng).to(device)
            epoch_loss = torch.zeros(len(active), dtype=torch.float64, device=device)
            for start in range(0, n, batch):
                rows = order[start:start + batch]
                step += 1
                epoch_loss += _step(packed, xt[rows], yt[rows], alpha, step)
            losses = (epoch_loss / n).tolist()
            for slot, i in enumerate(active):
                n_iter[i] = epoch + 1
                loss = losses[slot]
                curves[i].append(loss)
                stale[i] = stale[i] + 1 if loss > best[i] - tol else 0
                best[i] = min(best[i], loss)
                if stale[i] > n_iter_no_change or n_iter[i] >= max_iter:
                    converged.append(i)
        for i, (w, mo) in zip(active, packed.unpack()):
            weights[i], moments[i] = w, mo
        active = [i for i in active if i not in converged]
    return FittedGrid(points=list(points), weights=[tuple(w) for w in weights], n_iter=n_iter, loss_curves=curves)


def _step(packed: _Packed, xb: torch.Tensor, yb: torch.Tensor, alpha: float, step: int) -> torch.Tensor:
    """One mini-batch of every packed grid point; returns each point's batch loss times the batch size."""
    nb, groups, k = xb.shape[0], packed.groups, packed.k
    w1, b1, w2, b2 = packed.views(packed.param)
    g_w1, g_b1, g_w2, g_b2 = packed.views(packed.grad)
    z = torch.addmm(b1, xb, w1)
    a = torch.relu(z)
    logits = torch.addmm(b2, a, w2).view(nb, groups, k)
    logp = torch.log_softmax(logits, dim=2)
    target = yb.view(nb, 1, 1).expand(nb, groups, 1)
    picked = logp.gather(2, target).squeeze(2)  # (nb, G)
    # sklearn's batch loss: mean cross-entropy + 0.5 * alpha * (||W1||^2 + ||W2||^2) / nb, weighed by nb.
    squares = torch.zeros(groups, dtype=torch.float32, device=xb.device)
    squares.index_add_(0, packed.group_of_col, torch.linalg.vector_norm(w1, dim=0).square())
    squares += torch.linalg.vector_norm(w2, dim=0).square().view(groups, k).sum(dim=1)
    batch_loss = -picked.sum(dim=0).double() + 0.5 * alpha * squares.double()
    # Gradients of the mean loss (sklearn divides every gradient by the batch size).
    delta = logp.exp_()
    delta.scatter_add_(2, target, torch.full((nb, groups, 1), -1.0, device=xb.device))
    delta = delta.view(nb, groups * k).div_(nb)
    torch.addmm(w2, a.t(), delta, beta=alpha / nb, out=g_w2)
    g_w2.mul_(packed.mask)
    torch.sum(delta, dim=0, out=g_b2)
    dz = (delta @ w2.t()).mul_(z > 0)
    torch.addmm(w1, xb.t(), dz, beta=alpha / nb, out=g_w1)
    torch.sum(dz, dim=0, out=g_b1)
    # sklearn's Adam: param -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), over the flat buffers.
    correction = math.sqrt(1 - BETA2 ** step) / (1 - BETA1 ** step)
    packed.m.mul_(BETA1).add_(packed.grad, alpha=1 - BETA1)
    packed.v.mul_(BETA2).addcmul_(packed.grad, packed.grad, value=1 - BETA2)
    denominator = torch.sqrt(packed.v, out=packed.scratch).add_(EPS).mul_(packed.inverse_rate)
    packed.param.addcdiv_(packed.m, denominator, value=-correction)
    return batch_loss
