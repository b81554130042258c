"""Cosine similarity of relation vectors, the one definition (inference API and evaluator)."""
from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of ``a`` (H,) or (n, H) with every row of ``b`` (m, H), in float64 (0 for zero vectors):
    (m,) for one vector, (n, m) for many.

    Equal rows give bit-identical scores by construction: each distinct row of ``a`` and ``b`` is
    scored once and the results are spread back. A plain ``a @ b.T`` does not promise that: a BLAS
    kernel may sum a row at one position of the matrix in another order than the same row at another
    (measured: a repeated analogy choice scored differently in its last bits), and ties must be exact.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    single = a.ndim == 1
    a2 = a.reshape(1, -1) if single else a
    ua, a_rows = _distinct_rows(a2)
    ub, b_rows = _distinct_rows(b)
    scores = _normalised(ua) @ _normalised(ub).T
    out = scores[np.ix_(a_rows, b_rows)]
    return out[0] if single else out


def _distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``x`` and, for each row of ``x``, the index of its distinct row."""
    if len(x) < 2:
        return x, np.arange(len(x))
    distinct, inverse = np.unique(x, axis=0, return_inverse=True)
    return distinct, inverse.reshape(-1)


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
