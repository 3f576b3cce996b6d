"""Strategies used by tests through the real config (``distill._target_=kdx_test_helpers....``)."""
import torch

from kdx.distill.none import CrossEntropy


class NaNAtStep(CrossEntropy):
    """Cross-entropy that returns NaN from the ``at_step``-th call on (counting from 0)."""

    def __init__(self, at_step: int = 3, w_ce: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(w_ce=w_ce, label_smoothing=label_smoothing)
        self.at_step = at_step
        self.calls = 0

    def loss_terms(self, student, teacher, batch, epoch):
        terms = super().loss_terms(student, teacher, batch, epoch)
        self.calls += 1
        if self.calls > self.at_step:
            terms["ce"] = terms["ce"] * torch.tensor(float("nan"))
        return terms
