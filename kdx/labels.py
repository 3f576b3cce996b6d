"""The method label of a run (results, W&B, report columns), from Hydra's group choices."""
from __future__ import annotations

from typing import Any

#: optim group options that are methods of their own (a paper's contribution): they appear in the label
METHOD_OPTIMISERS = frozenset({"dot"})


def method_label(choices: Any) -> str:
    """``distill``, plus ``+<transform>`` for each transform chosen (``distill=kd distill/teacher_transform=topk_scale``
    → ``kd+topk_scale``, ``distill/logit_transform=ls`` → ``kd+ls``), plus ``@<teacher>`` for a teacher group other
    than the network teacher (``distill=dkd teacher=reffakd`` → ``dkd@reffakd``).

    This is the label of the command line (it names run folders). The label a run records is
    :func:`run_label`, which also knows whether the strategy used a teacher at all."""
    get = choices.get if hasattr(choices, "get") else (lambda k: None)
    label = str(get("distill"))
    for group in ("distill/teacher_transform", "distill/logit_transform"):
        transform = get(group)
        if transform not in (None, "null", "none"):
            label += f"+{transform}"
    if get("optim") in METHOD_OPTIMISERS:  # distill=kd optim=dot → kd+dot
        label += f"+{get('optim')}"
    teacher = get("teacher")
    if teacher not in (None, "net") and str(teacher) != label:
        label += f"@{teacher}"
    return label


def run_label(label: str, uses_teacher: bool) -> str:
    """The recorded label: a strategy that uses no teacher (``distill=none``, the baseline) carries neither a
    transform nor a teacher suffix, whatever teacher an experiment selects: its label is the ``distill`` part."""
    return label if uses_teacher else label.split("+", 1)[0].split("@", 1)[0]


__all__ = ["method_label", "run_label"]
