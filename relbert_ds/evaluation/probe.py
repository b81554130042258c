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
from dataclasses import dataclass, field
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
class _Layers:
    """The trainable tensors of a set of grid points, packed side by side (with Adam's moments)."""

    w1: torch.Tensor  # (D, sum h)
    b1: torch.Tensor  # (sum h,)
    w2: torch.Tensor  # (sum h, G * K), block diagonal
    b2: torch.Tensor  # (G * K,)
    moments: list[torch.Tensor] = field(default_factory=list)  # m and v of each tensor above, in order

    def tensors(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]


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


def _pack(weights: Sequence[tuple[torch.Tensor, ...]], moments: Sequence[Sequence[torch.Tensor]],
          n_classes: int) -> tuple[_Layers, torch.Tensor]:
    """Pack per-point (w1, b1, w2, b2) and their Adam moments; returns the layers and the w2 block mask."""
    widths = [w[0].shape[1] for w in weights]
    total, groups = sum(widths), len(weights)
    device = weights[0][0].device

    def block_diag(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(total, groups * n_classes, device=device)
        row = 0
        for g, (part, width) in enumerate(zip(parts, widths)):
            out[row:row + width, g * n_classes:(g + 1) * n_classes] = part
            row += width
        return out

    def packed(items: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.cat([i[0] for i in items], dim=1), torch.cat([i[1] for i in items]),
                block_diag([i[2] for i in items]), torch.cat([i[3] for i in items])]

    w1, b1, w2, b2 = packed(weights)
    # moments[g] = [m_w1, m_b1, m_w2, m_b2, v_w1, v_b1, v_w2, v_b2]
    m = packed([mo[:4] for mo in moments])
    v = packed([mo[4:] for mo in moments])
    mask = block_diag([torch.ones(w, n_classes, device=device) for w in widths])
    return _Layers(w1, b1, w2, b2, moments=m + v), mask


def _unpack(layers: _Layers, widths: Sequence[int], n_classes: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Inverse of :func:`_pack`: per point ([w1, b1, w2, b2], its 8 moment tensors)."""
    out = []
    row = 0

    def take(tensors: Sequence[torch.Tensor], g: int, row: int, width: int) -> list[torch.Tensor]:
        w1, b1, w2, b2 = tensors
        cols = slice(g * n_classes, (g + 1) * n_classes)
        return [w1[:, row:row + width].clone(), b1[row:row + width].clone(), w2[row:row + width, cols].clone(),
                b2[cols].clone()]

    for g, width in enumerate(widths):
        out.append((take(layers.tensors(), g, row, width),
                    take(layers.moments[:4], g, row, width) + take(layers.moments[4:], g, row, width)))
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
    final: dict[int, list[torch.Tensor]] = {}
    n_iter = [0] * len(points)
    curves: list[list[float]] = [[] for _ in points]
    best = [math.inf] * len(points)
    stale = [0] * len(points)
    active = list(range(len(points)))
    order_rng = torch.Generator().manual_seed(int(seed))
    step = 0
    while active:
        layers, mask = _pack([weights[i] for i in active], [moments[i] for i in active], k)
        widths = [points[i].hidden for i in active]
        lr_cols = torch.cat([torch.full((w,), points[i].learning_rate) for i, w in zip(active, widths)]).to(device)
        lr_out = torch.cat([torch.full((k,), points[i].learning_rate) for i in active]).to(device)
        lrs = [lr_cols, lr_cols, lr_out, lr_out]
        group_of_col = torch.repeat_interleave(torch.arange(len(active)), torch.tensor(widths)).to(device)
        converged: list[int] = []
        # Train epochs with this packing until one of its points converges (or all reach max_iter).
        while not converged:
            epoch = n_iter[active[0]]  # every active point has run the same number of epochs
            order = torch.randperm(n, generator=order_rng).to(device)
            epoch_loss = torch.zeros(len(active), dtype=torch.float64, device=device)
            for start in range(0, n, batch):
                rows = order[start:start + batch]
                step += 1
                epoch_loss += _step(layers, mask, lrs, group_of_col, xt[rows], yt[rows], k, alpha, step, len(active))
            losses = (epoch_loss / n).tolist()
            for slot, i in enumerate(active):
                n_iter[i] = epoch + 1
                loss = losses[slot]
                curves[i].append(loss)
                stale[i] = stale[i] + 1 if loss > best[i] - tol else 0
                best[i] = min(best[i], loss)
                if stale[i] > n_iter_no_change or n_iter[i] >= max_iter:
                    converged.append(i)
        for i, (w, mo) in zip(active, _unpack(layers, widths, k)):
            weights[i], moments[i] = w, mo
        for i in converged:
            final[i] = weights[i]
        active = [i for i in active if i not in converged]
    return FittedGrid(points=list(points), weights=[tuple(final[i]) for i in range(len(points))], n_iter=n_iter,
                      loss_curves=curves)


def _step(layers: _Layers, mask: torch.Tensor, lrs: Sequence[torch.Tensor], group_of_col: torch.Tensor,
          xb: torch.Tensor, yb: torch.Tensor, k: int, alpha: float, step: int, groups: int) -> torch.Tensor:
    """One mini-batch of every packed grid point; returns each point's batch loss times the batch size."""
    nb = xb.shape[0]
    z = torch.addmm(layers.b1, xb, layers.w1)
    a = torch.relu(z)
    logits = torch.addmm(layers.b2, a, layers.w2).view(nb, groups, k)
    logp = torch.log_softmax(logits, dim=2)
    picked = logp.gather(2, yb.view(nb, 1, 1).expand(nb, groups, 1)).squeeze(2)  # (nb, G)
    # sklearn's batch loss: mean cross-entropy + 0.5 * alpha * (||W1||^2 + ||W2||^2) / nb, weighed by nb.
    squares = torch.zeros(groups, dtype=torch.float32, device=xb.device)
    squares.index_add_(0, group_of_col, layers.w1.square().sum(dim=0))
    squares += layers.w2.square().sum(dim=0).view(groups, k).sum(dim=1)
    batch_loss = -picked.sum(dim=0).double() + 0.5 * alpha * squares.double()
    # Gradients of the mean loss (sklearn divides every gradient by the batch size).
    delta = torch.softmax(logits, dim=2)
    delta.scatter_add_(2, yb.view(nb, 1, 1).expand(nb, groups, 1), torch.full((nb, groups, 1), -1.0, device=xb.device))
    delta = delta.view(nb, groups * k) / nb
    g_w2 = (a.t() @ delta + alpha / nb * layers.w2) * mask
    g_b2 = delta.sum(dim=0)
    dz = (delta @ layers.w2.t()) * (z > 0)
    g_w1 = xb.t() @ dz + alpha / nb * layers.w1
    g_b1 = dz.sum(dim=0)
    correction = math.sqrt(1 - BETA2 ** step) / (1 - BETA1 ** step)
    for index, (param, grad) in enumerate(zip(layers.tensors(), (g_w1, g_b1, g_w2, g_b2))):
        m, v = layers.moments[index], layers.moments[4 + index]
        m.mul_(BETA1).add_(grad, alpha=1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        param.sub_(lrs[index] * correction * m / (v.sqrt() + EPS))
    return batch_loss
