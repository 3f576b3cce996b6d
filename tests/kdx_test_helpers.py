"""Strategies and models used by tests through the real config (``distill._target_=kdx_test_helpers....``,
``model.net._target_=kdx_test_helpers.TinyNet``): what a user plugs in from their own module."""
import torch

from kdx.distill.base import Strategy
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


class SigtermOnce(CrossEntropy):
    """Cross-entropy that sends SIGTERM to its own process at the first step of epoch ``at_epoch`` (1-based), once:
    the file ``flag`` records that it did, so the resumed run trains on (a scheduler's stop, then a resume)."""

    def __init__(self, at_epoch: int = 3, flag: str = "sigterm.flag", w_ce: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(w_ce=w_ce, label_smoothing=label_smoothing)
        self.at_epoch, self.flag = at_epoch, flag

    def loss_terms(self, student, teacher, batch, epoch):
        import os
        import pathlib
        import signal

        if epoch == self.at_epoch and not pathlib.Path(self.flag).exists():
            pathlib.Path(self.flag).write_text("sent")
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss_terms(student, teacher, batch, epoch)


class UserKD(Strategy):
    """A user's own strategy, written against the documented contract: subclass Strategy, declare what it reads,
    return named, weighted loss terms. Its config keys are its constructor's arguments."""

    def __init__(self, temperature: float = 2.0, w_ce: float = 0.5, w_kd: float = 0.5) -> None:
        super().__init__()
        self.temperature, self.w_ce, self.w_kd = temperature, w_ce, w_kd

    def loss_terms(self, student, teacher, batch, epoch):
        import torch.nn.functional as F

        t = self.temperature
        kl = F.kl_div(F.log_softmax(student.logits / t, 1), F.softmax(teacher.logits / t, 1), reduction="batchmean")
        return {"ce": self.w_ce * F.cross_entropy(student.logits, batch.y), "kd": self.w_kd * kl * t * t}


class TinyNet(torch.nn.Module):
    """A user's own network: it knows nothing of kdx (no ``name``, no ``taps``) and calls its class count
    ``classes``; it declares no tap sets."""

    def __init__(self, classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))
