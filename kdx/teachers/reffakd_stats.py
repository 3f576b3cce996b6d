"""What a ReffAKD soft-label table does to the student: how flat it is and how much label smoothing it amounts to.

- :func:`table_stats`: the entropy of the rows of ``Q`` (nats, and relative to ``log C``), the probability each row
  gives its own class ``Q[c, c]``, and the label-smoothing strength ``ε`` whose target puts the same mean mass on
  the true class (``(1−ε) + ε/C = mean Q[c, c]``).
- :func:`smoothing_at_optimum`: the student distribution that minimises ReffAKD's loss
  ``α·T²·w·CE(Q[y], softmax(z/T)) + (1−α)·CE(y, softmax(z))`` for each class ``y`` (``w`` = 1 for
  ``batchmean_ce``, 1/C for ``kldiv_mean``, whose KL differs from the cross-entropy by a constant), and its
  label-smoothing equivalent. At ``T = 1`` the optimum is the mixture
  ``(α·w·Q[y] + (1−α)·e_y)/(α·w + 1−α)``.
- ``python -m kdx.teachers.reffakd_stats <artifact folder | results.json of a run>``: both, for a table and the
  loss settings of a run (or ``--alpha/--temperature/--soft-loss``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from kdx.teachers.reffakd_table import read_artifact


def equivalent_smoothing(true_class_prob: float, num_classes: int) -> float:
    """The label-smoothing ``ε`` whose target gives the true class ``p``: ``(1−ε) + ε/C = p``."""
    return (1.0 - float(true_class_prob)) * num_classes / (num_classes - 1)


def table_stats(Q: Tensor) -> dict[str, float]:
    """Row entropy and true-class mass of the soft-label table ``Q`` ``[C, C]`` (rows sum to 1)."""
    Q = Q.to(torch.float64)
    c = Q.shape[0]
    entropy = -torch.special.xlogy(Q, Q).sum(dim=1)
    diag = torch.diagonal(Q)
    return {
        "num_classes": c,
        "entropy_mean": float(entropy.mean()),
        "entropy_rel_mean": float(entropy.mean() / math.log(c)),  # 1: uniform rows
        "true_class_prob_mean": float(diag.mean()),
        "true_class_prob_min": float(diag.min()),
        "true_class_prob_max": float(diag.max()),
        "q_min": float(Q.min()),
        "q_max": float(Q.max()),
        "label_smoothing_equivalent": equivalent_smoothing(float(diag.mean()), c),
    }


def smoothing_at_optimum(Q: Tensor, alpha: float, temperature: float, soft_loss: str = "batchmean_ce",
                         max_iter: int = 100) -> dict[str, float]:
    """The per-class minimiser of ReffAKD's loss and its label-smoothing equivalent.

    Each class's loss is convex in its logits ``z``; damped Newton steps (float64) from the soft term's own optimum
    ``z = T·log Q[y]`` until the gradient is below 1e-10.
    """
    Q = Q.to(torch.float64)
    c = Q.shape[0]
    if soft_loss not in ("batchmean_ce", "kldiv_mean"):
        raise ValueError(f"soft_loss={soft_loss!r}: batchmean_ce or kldiv_mean")
    if alpha <= 0.0:  # plain cross-entropy: the optimum is the one-hot label (at infinite logits)
        return {"true_class_prob_mean": 1.0, "label_smoothing_equivalent": 0.0, "entropy_mean": 0.0}
    a, T, w = float(alpha), float(temperature), (1.0 if soft_loss == "batchmean_ce" else 1.0 / c)
    eye = torch.eye(c, dtype=torch.float64)

    def loss(z: Tensor) -> Tensor:  # one value per class (row)
        soft = -(Q * torch.log_softmax(z / T, dim=1)).sum(dim=1)
        return a * T * T * w * soft - (1.0 - a) * torch.diagonal(torch.log_softmax(z, dim=1))

    def fisher(p: Tensor) -> Tensor:  # the Hessian of CE(·, softmax(z)) in z: diag(p) − p·pᵀ, per row
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)

    z = T * torch.log(Q)
    for _ in range(max_iter):
        p_t, p = torch.softmax(z / T, dim=1), torch.softmax(z, dim=1)
        grad = a * T * w * (p_t - Q) + (1.0 - a) * (p - eye)  # rows sum to 0: no shift of the logits
        if float(grad.abs().max()) < 1e-10:
            break
        # + 1·1ᵀ/C (the shift of the logits, along which nothing changes) and a ridge (classes of ~0 probability)
        hess = a * w * fisher(p_t) + (1.0 - a) * fisher(p) + 1.0 / c + 1e-9 * eye
        step = torch.linalg.solve(hess, grad.unsqueeze(2)).squeeze(2)
        before, t = loss(z), torch.ones(c, 1, dtype=torch.float64)
        for _ in range(40):  # halve the step of the classes whose loss would rise (beyond round-off)
            worse = (loss(z - t * step) > before + 1e-12 * before.abs().clamp_min(1.0)).unsqueeze(1)
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
        z = z - t * step
    p = torch.softmax(z, dim=1)
    p_true = float(torch.diagonal(p).mean())
    return {"true_class_prob_mean": p_true, "label_smoothing_equivalent": equivalent_smoothing(p_true, c),
            "entropy_mean": float(-torch.special.xlogy(p, p).sum(dim=1).mean())}


def _settings_of(path: Path) -> tuple[Path, dict[str, Any]]:
    """The artifact folder and the loss settings a results.json records (a folder: no settings)."""
    if path.is_dir():
        return path, {}
    res = json.loads(path.read_text())
    distill = (res.get("config") or {}).get("distill") or {}
    artifact = (res.get("teacher_info") or {}).get("artifact") or res.get("artifact")
    if not artifact:
        raise SystemExit(f"{path} names no ReffAKD table (teacher_info.artifact): pass the artifact folder instead.")
    keys = {"alpha": "alpha", "temperature": "temperature", "soft_loss": "soft_loss"}
    return Path(artifact), {k: distill[v] for k, v in keys.items() if v in distill}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdx.teachers.reffakd_stats", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a ReffAKD artifact folder, or the results.json of a run that used one")
    p.add_argument("--alpha", type=float, default=None, help="the loss's α (default: the run's, else 0.5)")
    p.add_argument("--temperature", type=float, default=None, help="the loss's T (default: the run's, else 5)")
    p.add_argument("--soft-loss", default=None,
                   help="batchmean_ce | kldiv_mean (default: the run's, else batchmean_ce)")
    a = p.parse_args(argv)
    folder, run = _settings_of(Path(a.path))
    table, meta = read_artifact(folder)
    alpha = a.alpha if a.alpha is not None else float(run.get("alpha", 0.5))
    temperature = a.temperature if a.temperature is not None else float(run.get("temperature", 5.0))
    soft_loss = a.soft_loss or str(run.get("soft_loss", "batchmean_ce"))
    out = {
        "artifact": str(folder),
        "dataset": meta.get("dataset"),
        "ae_best_test_mse": meta.get("best_test_mse"),
        "ae_zero_output_test_mse": meta.get("zero_output_test_mse"),
        "table": table_stats(table["Q"]),
        "loss": {"alpha": alpha, "temperature": temperature, "soft_loss": soft_loss},
        "optimum": smoothing_at_optimum(table["Q"], alpha, temperature, soft_loss),
    }
    print(json.dumps(out, indent=2))
    return 0


__all__ = ["equivalent_smoothing", "main", "smoothing_at_optimum", "table_stats"]

if __name__ == "__main__":
    sys.exit(main())
