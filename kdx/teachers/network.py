"""A frozen network teacher, and where its weights come from (``teacher=net``).

- :class:`NetworkTeacher`: frozen means ``eval()`` always (also after ``train()`` is called on it), no parameter
  requires grad, the forward runs under ``torch.no_grad()``.
- :class:`NetworkTeacherSource` (the ``teacher=net`` node): ``teacher.ckpt`` if given; else the teacher store
  (``paths.teachers/<dataset>/<arch>/``); else, with ``auto_train``, kdx trains the teacher first with the teacher
  recipe :class:`TeacherRecipe` (``teacher.train``) and stores it (only a run of its whole budget is stored).
- ``teacher.from_pretrained``: the teacher is ``teacher.model``'s pretrained weights as they are (timm's hub or
  ``teacher.model.pretrained_file``); no checkpoint, store or training. Its classifier must already have the data's
  classes (an ImageNet teacher on ImageNet); else fine-tune it first (the teacher recipe, or ``task=train``).
- ``teacher.input``: the teacher's own view of the student's batch (:mod:`kdx.models.input_view`: its
  normalisation and input size, ``auto`` from the model's pretrained configuration), built on the device by
  :meth:`NetworkTeacher.adapt_input`; the network is built for that size (a ViT's ``img_size``), and a size it
  cannot take stops at load, naming ``teacher.input.size``. A teacher kdx would train first is refused a view:
  it would be trained on the data as it is (give the network its resolution with ``teacher.model.input_size``).
- Under DDP every rank takes part in training a missing teacher; only rank 0 holds the store's lock and writes
  (:func:`kdx.dist.rank` tells the ranks apart under torchrun, Lightning, submitit and SLURM).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig

from kdx.distill.base import ModelOutput
from kdx.errors import CheckpointError, ConfigError
from kdx.labels import model_name
from kdx.io import checkpoint_meta, load_into, load_state_dict_file, sha256_file
from kdx.models.input_view import InputView, ViewSettings, resolve_size, resolve_view
from kdx.teachers.base import Teacher, TeacherContext, TeacherSource

log = logging.getLogger(__name__)


class NetworkTeacher(Teacher):
    """A trained network, frozen; ``meta`` is its sidecar (architecture, dataset, classes, accuracy, sha256).

    ``ckpt`` None: the network already holds its weights (``teacher.from_pretrained``; ``meta['source']`` names
    them). ``view``: the teacher's own view of the batch (:meth:`adapt_input`), None for the batch as it is.
    """

    def __init__(self, net: nn.Module, ckpt: Optional[str | Path], meta: Optional[dict[str, Any]] = None,
                 dataset_key: Optional[str] = None, view: Optional[InputView] = None) -> None:
        super().__init__()
        self.net = net
        self.view = view
        if ckpt is not None:  # a classifier of another class count stops here, naming teacher.ckpt
            load_into(self.net, load_state_dict_file(ckpt, "teacher.ckpt"), ckpt, "teacher.ckpt")
        self.net.requires_grad_(False)
        self.eval()
        meta = meta or {}
        if meta.get("num_classes") is not None:
            n_out = _num_outputs(self.net)
            if n_out is not None and n_out != meta["num_classes"]:
                raise CheckpointError(f"Sidecar of {ckpt} says {meta['num_classes']} classes, weights have {n_out}.")
        same_data = dataset_key is None or meta.get("dataset") in (None, dataset_key)
        self.known_acc1 = meta.get("test_acc1") if same_data else None
        self.info = {
            "arch": meta.get("arch"),
            "ckpt": str(ckpt) if ckpt is not None else meta.get("source"),
            "sha256": meta.get("sha256") or (sha256_file(ckpt) if ckpt is not None else None),
            "dataset": meta.get("dataset"),
            "recorded_test_acc1": meta.get("test_acc1"),
            "epochs": meta.get("epochs"),
            "budget": meta.get("budget"),
        }
        if view is not None:
            self.info["input"] = view.describe()
        if not (meta.get("budget") or {}).get("complete", True):
            log.warning("teacher.ckpt=%s was trained with a cut-short budget (%s): its soft targets are those of a "
                        "barely trained network.", ckpt, meta["budget"].get("cut"))

    def describe(self) -> str:
        i = self.info
        budget = i.get("budget") or {}
        cut = "" if budget.get("complete", True) else f", cut short: {budget.get('cut')}"
        acc = "unknown" if i["recorded_test_acc1"] is None else f"{float(i['recorded_test_acc1']):.2f} %"
        view = i.get("input")
        sees = ""
        if view is not None:
            size = "×".join(map(str, view["size"])) if view["size"] else "the data's size"
            stats = f", mean {view['mean']}, std {view['std']}" if "mean" in view else ""
            sees = f"; sees {size} ({view['interpolation']}{stats})"
        return (f"{i['arch'] or 'network'} from {i['ckpt']} (sha256 {str(i['sha256'])[:12]}, trained on "
                f"{i['dataset'] or 'unknown data'} for {_epochs(i['epochs'])}{cut}, "
                f"recorded test top-1 {acc}{sees})")

    def train(self, mode: bool = True) -> "NetworkTeacher":
        return super().train(False)  # frozen: BN uses running statistics, always

    @property
    def network(self) -> nn.Module:
        return self.net

    @property
    def sees_own_view(self) -> bool:
        return self.view is not None

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.view is None else self.view(x)

    @torch.no_grad()
    def forward(self, x, y=None, idx=None) -> ModelOutput:
        return ModelOutput(self.net(x))


@dataclass
class TeacherRecipe:
    """``teacher.train``: how a missing teacher is trained (plain cross-entropy, the run's data).

    ``max_epochs``/``optim``/``scheduler`` null take this run's own (the scheduler's ``total_epochs`` follows the
    teacher's epochs). A config node that only describes: the run context reads it to build the teacher's run.
    """

    max_epochs: Optional[int] = None
    optim: Optional[Any] = None
    scheduler: Optional[Any] = None
    seed: int = 0


class NetworkTeacherSource(TeacherSource):
    """``teacher=net``: a network teacher from ``ckpt``, else the store, else trained first (``auto_train``)."""

    has_network = True

    def __init__(self, model: DictConfig, ckpt: Optional[str] = None, auto_train: bool = True,
                 store_tag: Optional[str] = None, train: Optional[DictConfig] = None,
                 input: Optional[DictConfig] = None, from_pretrained: bool = False) -> None:
        self.model_config, self.ckpt, self.auto_train = model, ckpt, bool(auto_train)
        self.store_tag, self.recipe = store_tag, train
        self.view_settings = ViewSettings.from_node(input, "teacher.input")
        self.from_pretrained = bool(from_pretrained)
        self.arch = model_name(model)
        if self.from_pretrained and self.ckpt:
            raise ConfigError("teacher.from_pretrained=true takes the model's pretrained weights as the teacher, and "
                              f"teacher.ckpt={self.ckpt} names other weights: set one of them.")

    def load(self, ctx: TeacherContext) -> NetworkTeacher:
        net = self._network(ctx)
        view = resolve_view(self.view_settings, net, ctx.mean, ctx.std, "teacher.input")
        if view is not None:
            _check_view(net, view, ctx.image_shape)
        if self.from_pretrained:
            return NetworkTeacher(net, None, self._pretrained_meta(net, ctx), ctx.dataset_key, view)
        if self.ckpt:
            path = Path(str(self.ckpt)).expanduser()
            meta = _sidecar_for(path)
            self._check_sidecar(path, meta, ctx)
            return NetworkTeacher(net, path, {**meta, "arch": self.arch}, ctx.dataset_key, view)
        return self._from_store(ctx, net, view)

    def _network(self, ctx: TeacherContext) -> nn.Module:
        """``teacher.model`` for this data, built for the teacher's input size; pretrained weights are fetched only
        for ``from_pretrained`` (a checkpoint or the store replaces them otherwise)."""
        node, extra = self.model_config, {}
        size = self.view_settings.size
        if "data_shape" in node:  # timm: the network's input size (a ViT's img_size) is the one it will see
            hw = None if size == "auto" else resolve_size(size, None, "teacher.input.size")
            extra["data_shape"] = None if size == "auto" else [ctx.image_shape[0], *hw] if hw else list(ctx.image_shape)
        if not self.from_pretrained:
            extra.update({k: v for k, v in (("pretrained", False), ("pretrained_file", None)) if k in node})
        elif "pretrained" in node and not (node.get("pretrained") or node.get("pretrained_file")):
            raise ConfigError("teacher.from_pretrained=true needs pretrained weights: teacher.model.pretrained=true "
                              "(the hub) or teacher.model.pretrained_file=<a local weights file>.")
        return instantiate(node, num_classes=ctx.num_classes, **extra)

    def _pretrained_meta(self, net: nn.Module, ctx: TeacherContext) -> dict[str, Any]:
        """The sidecar of pretrained weights; their classifier must have the data's class count."""
        pcfg = getattr(net, "pretrained_cfg", None) or {}
        classes = pcfg.get("num_classes", _num_outputs(net))
        if classes is not None and int(classes) != ctx.num_classes:
            raise ConfigError(
                f"teacher.from_pretrained=true: the pretrained classifier of {self.arch} has {classes} classes but "
                f"data={ctx.dataset_key} has {ctx.num_classes} (it would get a fresh, untrained classifier). Fine-tune "
                "it on this data first: teacher.from_pretrained=false (kdx fine-tunes it with the teacher recipe, "
                "teacher.train) or `task=train` (e.g. experiment=cifar100/pretrained_teacher/<model>).")
        file = self.model_config.get("pretrained_file")
        source = f"pretrained file {file}" if file else f"pretrained weights ({pcfg.get('hf_hub_id') or self.arch})"
        return {"arch": self.arch, "source": source, "sha256": sha256_file(Path(file).expanduser()) if file else None,
                "num_classes": classes}

    def _from_store(self, ctx: TeacherContext, net: nn.Module, view: Optional[InputView]) -> NetworkTeacher:
        key = ctx.dataset_key + (f"-{self.store_tag}" if self.store_tag else "")
        store = ctx.store
        if ctx.rank > 0:
            # rank 0 holds the lock and writes the store; if it is training the teacher, this rank joins it
            found = store.lookup(key, self.arch)
            weights, meta = found if found is not None else self._train(ctx, view)
            return NetworkTeacher(net, weights, meta, ctx.dataset_key, view)
        with store.lock(key, self.arch):
            found = store.lookup(key, self.arch)
            if found is None:
                if not self.auto_train:
                    raise CheckpointError(
                        f"No {self.arch} teacher for '{key}' in the teacher store {store.entry_dir(key, self.arch)}. "
                        f"Pass teacher.ckpt=<path>, train one with `python -m kdx task=train model={self.arch} "
                        f"data=...`, or set teacher.auto_train=true."
                    )
                log.warning("No %s teacher for '%s' in the teacher store (%s): training it first with the teacher "
                            "recipe (teacher.train), then distilling.", self.arch, key, store.root)
                weights, meta = self._train(ctx, view)
                found = (weights, meta) if store.register(key, self.arch, weights, meta) is None \
                    else store.lookup(key, self.arch)
            weights, meta = found
        return NetworkTeacher(net, weights, meta, ctx.dataset_key, view)

    def _train(self, ctx: TeacherContext, view: Optional[InputView]) -> tuple[Path, dict[str, Any]]:
        if view is not None:
            raise ConfigError(
                f"teacher.input sets the view of a teacher trained elsewhere, but kdx would train this {self.arch} "
                "first (no teacher.ckpt, none in the store), on the data as it is. Set teacher.input back to null and "
                "give the network its resolution with teacher.model.input_size (its training then runs at that "
                "size), or pass teacher.ckpt=<weights trained with that view>.")
        return ctx.train_teacher(self.model_config, self.recipe)

    def _check_sidecar(self, path: Path, meta: dict[str, Any], ctx: TeacherContext) -> None:
        if meta.get("arch") not in (None, self.arch):
            raise CheckpointError(
                f"teacher.ckpt={path} was trained as '{meta['arch']}' but the teacher model is '{self.arch}'. "
                f"Set teacher_arch={meta['arch']} or pass a {self.arch} checkpoint."
            )
        if meta.get("num_classes") not in (None, ctx.num_classes):
            raise CheckpointError(
                f"teacher.ckpt={path} has {meta['num_classes']} classes but data={ctx.dataset_key} has "
                f"{ctx.num_classes}. Pass a teacher trained on this dataset (teacher.ckpt=...)."
            )


def _epochs(n: Optional[int]) -> str:
    return "? epochs" if n is None else f"{n} epoch" + ("" if n == 1 else "s")


def _sidecar_for(ckpt: Path) -> dict[str, Any]:
    for cand in (ckpt.with_suffix(".json"), ckpt.parent / "teacher.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except json.JSONDecodeError:
                return {}
    return checkpoint_meta(ckpt)  # no sidecar: what an mdistiller/CRD file records (its epochs)


def _check_view(net: nn.Module, view: InputView, image_shape: tuple[int, ...]) -> None:
    """One forward of the teacher's view of a zero batch: a size the network cannot take stops at load."""
    try:
        with torch.no_grad():
            net.eval()(view(torch.zeros(1, *image_shape)))
    except Exception as e:  # noqa: BLE001 - any shape or assertion error of the network
        raise ConfigError(
            f"teacher.input.size: the teacher ({type(net).__name__}) cannot take its view of the data "
            f"({view.describe()['size'] or list(image_shape[1:])}): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Set teacher.input.size to a size it takes (auto: the "
            "model's pretrained input size).") from e


def _num_outputs(net: nn.Module) -> Optional[int]:
    last = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


__all__ = ["NetworkTeacher", "NetworkTeacherSource", "TeacherRecipe"]
