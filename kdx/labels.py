"""Labels of a run: its method (results, W&B, report columns) from Hydra's group choices, its models' names."""
from __future__ import annotations

from typing import Any, Mapping

#: optim group options that are methods of their own (a paper's contribution): they appear in the label
METHOD_OPTIMISERS = frozenset({"dot"})


def method_label(choices: Any, overrides: Any = ()) -> str:
    """``distill``, plus ``+<base>`` for a base loss other than CE (``distill=deit distill/base=kd`` → ``deit+kd``),
    ``+<transform>`` for each transform chosen (``distill=kd distill/teacher_transform=topk_scale``
    → ``kd+topk_scale``, ``distill/logit_transform=ls`` → ``kd+ls``), plus ``@<teacher>`` for a teacher group other
    than the network teacher (``distill=dkd teacher=reffakd`` → ``dkd@reffakd``).

    A strategy class given on the command line (``overrides``: ``distill._target_=mypkg.MyKD``) is the method
    that runs: its class name replaces the ``distill`` choice (``MyKD``).

    This is the label of the command line (it names run folders). The label a run records is
    :func:`run_label`, which also knows whether the strategy used a teacher at all."""
    get = choices.get if isinstance(choices, Mapping) else (lambda k: None)
    label = str(get("distill"))
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if sep and key.lstrip("+~") == "distill._target_" and value:
            label = value.rsplit(".", 1)[-1]
    for group in ("distill/base", "distill/teacher_transform", "distill/logit_transform"):
        transform = get(group)
        if transform not in (None, "null", "none", "ce"):  # distill/base=ce: DeiT's own default base
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


def model_name(node: Mapping) -> str:
    """The name a model node goes by in logs, run folders, results and the teacher store: ``model.name``, else
    (a user model with ``name: null``) the class its ``_target_`` (or ``net._target_``) names."""
    name = node.get("name")
    if name:
        return str(name)
    net = node.get("net")
    target = (net.get("_target_") if isinstance(net, Mapping) else None) or node.get("_target_") or "model"
    return str(target).rsplit(".", 1)[-1]


__all__ = ["method_label", "model_name", "run_label"]
