"""Held-out and subset selection: stratified by class, deterministic in a seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def resolve_amount(amount: float | int, n: int, what: str) -> int:
    """Turn a fraction in ``(0, 1]`` (float) or a count (int) into a count in ``[0, n]``."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a float fraction or an int count, got {amount!r}")
    if isinstance(amount, (float, np.floating)):
        if 0 < amount <= 1:
            return int(round(float(amount) * n))
        if not float(amount).is_integer():
            raise ValueError(f"{what}={amount}: a fraction must lie in (0, 1]")
    count = int(amount)
    if not 0 <= count <= n:
        raise ValueError(f"{what}={amount}: a count must lie in [0, {n}]")
    return count


def stratified_split(labels: np.ndarray, k: int, seed: Sequence[int] | int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` of ``len(labels)`` positions, class-proportionally.

    Each class ``c`` (``n_c`` samples) contributes ``floor(k * n_c / N)``
    samples plus at most one more (largest remainders first, ties to the
    smaller class id), chosen by a permutation from ``np.random.default_rng(seed)``.
    Returns ``(taken, rest)``: sorted int64 position arrays, disjoint, covering all.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 <= k <= n:
        raise ValueError(f"cannot take {k} of {n} samples")
    classes, counts = np.unique(labels, return_counts=True)
    quota = k * counts / max(n, 1)
    take = np.floor(quota).astype(np.int64)
    extra = k - int(take.sum())
    if extra > 0:
        order = np.lexsort((classes, -(quota - take)))  # largest remainder, then class id
        take[order[:extra]] += 1
    rng = np.random.default_rng(seed)
    taken = []
    for c, t in zip(classes, take):
        pos = np.flatnonzero(labels == c)
        taken.append(pos[rng.permutation(len(pos))[:t]])
    taken_idx = np.sort(np.concatenate(taken)).astype(np.int64) if taken else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[taken_idx] = False
    return taken_idx, np.flatnonzero(mask).astype(np.int64)


__all__ = ["resolve_amount", "stratified_split"]
