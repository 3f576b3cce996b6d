"""The composition root: config → objects, in one place.

:func:`build` validates and resolves a composed config, then builds the run: data, strategy, regime (``module``),
teacher (through its source, which may train or build a missing one via the run context), the teacher-logit cache,
student, feature taps, optimiser and schedule, logger, callbacks and trainer. Nothing else in kdx instantiates from
the run's config; objects get their arguments here and never read the config tree at step time.

:class:`RunContext` is what a teacher source may use: the dataset's identity, the teacher store, this process's
rank, and :meth:`RunContext.train_teacher` / :meth:`RunContext.run_task`, which run another kdx job (a teacher's
training, ReffAKD's stage A) through the runner that was handed in (``run_job``): teachers never import the runner.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdx.callbacks import build_callbacks
from kdx.config import check_values, resolved, validate
from kdx.dist import local_rank, rank
from kdx.distill.base import DataInfo, Strategy
from kdx.distill.none import CrossEntropy
from kdx.errors import CheckpointError, ConfigError
from kdx.features import attach_feature_taps, check_config_taps
from kdx.labels import run_label
from kdx.loggers import build_logger
from kdx.labels import model_name
from kdx.optimizers import SplitLossOptimizer
from kdx.regimes.base import KDModule, Parts
from kdx.regimes.step import StepParts
from kdx.teachers.base import Teacher, TeacherContext, TeacherSource
from kdx.teachers.cache import CachedTeacher
from kdx.teachers.store import TeacherStore

log = logging.getLogger("kdx")
RunJob = Callable[[DictConfig], dict]


def instantiate_unwrapped(node: Any, **kwargs: Any) -> Any:
    """``instantiate``, re-raising kdx's own errors (which name the setting) instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, (CheckpointError, ConfigError, FileNotFoundError, ValueError)):
            raise cause from None
        raise


def instantiate_data(node: DictConfig) -> Any:
    """The datamodule, its data found and loaded (a missing dataset stops here, before any teacher is trained)."""
    dm = instantiate_unwrapped(node)
    if local_rank() == 0:
        dm.prepare_data()  # downloads, once per node
    dm.setup("fit")  # idempotent: Lightning's own call later reuses the loaded arrays
    return dm


@dataclass
class RunContext(TeacherContext):
    """What a teacher source may use (see the module docstring)."""

    cfg: DictConfig
    dataset_key: str
    num_classes: int
    output_dir: Path
    store: TeacherStore
    rank: int
    run_job: RunJob
    image_shape: tuple[int, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def train_teacher(self, model: DictConfig, recipe: Optional[DictConfig]) -> tuple[Path, dict[str, Any]]:
        """Train ``model`` from labels with the teacher recipe (a kdx job in ``<run>/teacher``)."""
        results = self.run_job(teacher_training_config(self.cfg, model, recipe, self.output_dir / "teacher"))
        return Path(results["teacher_path"]), results["teacher_meta"]

    def run_task(self, task: str, folder: str) -> dict[str, Any]:
        """Run this run's config as another ``task`` (e.g. ``reffakd_ae``) in ``<run>/<folder>``."""
        c = _sub_config(self.cfg, self.output_dir / folder)
        c["task"] = task
        return self.run_job(OmegaConf.create(c))


def _sub_config(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """The run's resolved config as a container, writing into ``output_dir`` (its logger too), not resuming."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c["paths"]["output_dir"] = str(output_dir)
    c["ckpt_path"] = None
    if isinstance(c.get("logger"), dict) and "save_dir" in c["logger"]:
        c["logger"]["save_dir"] = str(output_dir)  # the sub-run logs beside its own files
    if isinstance((c.get("callbacks") or {}).get("checkpoint"), dict):
        c["callbacks"]["checkpoint"]["dirpath"] = str(output_dir / "checkpoints")
    return c


def teacher_training_config(cfg: DictConfig, model: DictConfig, recipe: Optional[DictConfig],
                            output_dir: Path) -> DictConfig:
    """The config that trains ``model`` with plain cross-entropy under the teacher recipe (``teacher.train``):
    this run's data, trainer and perf; the recipe's epochs, optimiser, schedule and seed (null: this run's)."""
    c = _sub_config(cfg, output_dir)
    r = OmegaConf.to_container(recipe, resolve=True) if recipe is not None else {}
    c["task"] = "train"
    c["model"] = OmegaConf.to_container(model, resolve=True)
    c["distill"] = {"_target_": "kdx.distill.none.CrossEntropy"}
    c["module"] = {"_target_": "kdx.regimes.distill.DistillModule", "_partial_": True}
    c["teacher_cache"] = {"_target_": "kdx.teachers.cache.CacheSettings", "mode": "off"}
    c["seed"] = int(r.get("seed", c["seed"]))
    if "seed" in (c.get("data") or {}):
        c["data"]["seed"] = c["seed"]  # data order and augmentation follow the teacher's own seed
    for key in ("optim", "scheduler"):
        if r.get(key) is not None:
            c[key] = r[key]
    if r.get("max_epochs"):
        c["trainer"]["max_epochs"] = int(r["max_epochs"])
    if "total_epochs" in (c.get("scheduler") or {}):
        c["scheduler"]["total_epochs"] = c["trainer"]["max_epochs"]  # the schedule follows the teacher's epochs
    c["register_teacher"] = False  # the caller stores it under its own key
    out = OmegaConf.create(c)
    OmegaConf.set_struct(out, True)
    return out


@dataclass
class Job:
    """Everything one run is made of, built from the config (see :func:`build`)."""

    cfg: DictConfig
    ctx: RunContext
    datamodule: Any
    module: KDModule
    trainer: pl.Trainer
    logger: Any
    method: str
    pair: str

    @property
    def trains_teacher(self) -> bool:
        """Whether this run trains a network from labels (no teacher): its model can become a teacher."""
        return not self.module.strategy.needs_teacher


def _strategy(cfg: DictConfig) -> tuple[Strategy, str]:
    """The run's strategy and its label (what actually runs: task=train runs distill=none's plain CE)."""
    strategy = instantiate_unwrapped(cfg.distill)
    if cfg.task == "train" and strategy.needs_teacher:
        log.info("task=train: plain cross-entropy training, as distill=none (distill=%s is not used).", cfg.method)
        return CrossEntropy(), "none"
    return strategy, run_label(str(cfg.method), strategy.needs_teacher)


def _regime(cfg: DictConfig, strategy: Strategy) -> tuple[Callable[[Parts], KDModule], type[KDModule]]:
    factory = instantiate_unwrapped(cfg.module)
    cls = factory.func if isinstance(factory, functools.partial) else None
    if not (isinstance(cls, type) and issubclass(cls, KDModule)):
        raise ConfigError(f"module._target_={cfg.module._target_} is not a kdx regime (a kdx.regimes.base.KDModule "
                          "subclass, with _partial_: true).")
    if strategy.regime != cls.regime:
        raise ConfigError(
            f"{type(strategy).__name__} (distill) runs in the '{strategy.regime}' regime, but module={cls.regime} "
            f"({cls.__name__}) was selected. Set module={strategy.regime} (a method's config selects its regime: "
            "remove the module override)."
        )
    return factory, cls


def _trainer(cfg: DictConfig, module: KDModule, logger: Any, out: Path) -> pl.Trainer:
    extra = module.trainer_kwargs()
    clash = [k for k in extra if cfg.trainer.get(k) is not None]
    if clash:
        raise ConfigError(f"trainer.{clash[0]} is set by the {module.regime} regime ({extra[clash[0]]}); remove "
                          f"trainer.{clash[0]} from the config.")
    callbacks = build_callbacks(cfg)
    return instantiate(cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks,
                       default_root_dir=str(out), **extra)


def build(cfg: DictConfig, run_job: RunJob) -> Job:
    """Validate and resolve ``cfg``, then build every object of the run (see the module docstring)."""
    validate(cfg)
    cfg = resolved(cfg)
    check_values(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = instantiate_data(cfg.data)
    _fill_data_shape(cfg, dm.image_shape)
    perf = instantiate_unwrapped(cfg.perf)  # a bad perf.* value stops here, before any teacher training
    strategy, method = _strategy(cfg)
    regime, regime_cls = _regime(cfg, strategy)
    source: Optional[TeacherSource] = instantiate_unwrapped(cfg.teacher) if strategy.needs_teacher else None
    if strategy.views:  # a datamodule that cannot give the extra views stops here
        dm.request_views(strategy.views, type(strategy).__name__)
    if strategy.needs_features:  # a wrong tap name or a missing tap set stops here, before any teacher training
        nodes = [("model", cfg.model, strategy.student_taps)]
        if source is not None and source.model_config is not None:
            nodes.append(("teacher.model", source.model_config, strategy.teacher_taps))
        check_config_taps(strategy, nodes, int(dm.num_classes))
    cache = instantiate_unwrapped(cfg.teacher_cache).checked(strategy, type(source), dm, regime_cls.regime)
    ctx = RunContext(cfg=cfg, dataset_key=dm.dataset_key, num_classes=int(dm.num_classes), output_dir=out,
                     store=TeacherStore(cfg.paths.teachers), rank=rank(), run_job=run_job,
                     image_shape=tuple(dm.image_shape), mean=tuple(dm.mean), std=tuple(dm.std))
    teacher: Optional[Teacher] = source.load(ctx) if source is not None else None
    if cache is not None:
        teacher = CachedTeacher(teacher, cache, dm, ctx.dataset_key, precision=str(cfg.trainer.precision),
                                channels_last=bool(cfg.perf.channels_last))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same student init with or without a teacher
    student = instantiate_unwrapped(cfg.model, num_classes=ctx.num_classes)
    strategy.attach_data(DataInfo(ctx.num_classes, dm.train_labels(), int(cfg.seed)))
    strategy.attach_networks(student, teacher.network if teacher is not None else None)
    student_taps = teacher_taps = None
    if strategy.needs_features:  # hooks + shape-dependent modules, before the optimiser
        student_taps, teacher_taps = attach_feature_taps(strategy, student, teacher, dm.image_shape)
    optimizer = instantiate(cfg.optim)
    scheduler = instantiate(cfg.scheduler) if (cfg.get("scheduler") or {}).get("_target_") else None
    parts = Parts(
        step=StepParts(student, strategy, teacher, student_taps, teacher_taps, *_heads(strategy, student, teacher)),
        optimizer=optimizer, scheduler=scheduler, datamodule=dm, num_classes=ctx.num_classes,
        perf=perf, output_dir=out, seed=int(cfg.seed),
        split_losses=isinstance(optimizer, functools.partial) and issubclass(optimizer.func, SplitLossOptimizer),
    )
    module = regime(parts)
    student_name = model_name(cfg.model)
    pair = student_name if teacher is None else f"{teacher.info.get('arch') or 'teacher'}-{student_name}"
    logger = build_logger(cfg, {"method": method, "dataset": ctx.dataset_key, "pair": pair, "seed": int(cfg.seed)})
    trainer = _trainer(cfg, module, logger, out)
    if trainer.world_size > 1 and not strategy.supports_ddp:
        raise ConfigError(f"{type(strategy).__name__} keeps state that every DDP rank would have to share (its memory "
                          f"bank) and is refused under {trainer.world_size} processes: run it on one device "
                          "(trainer.devices=1, trainer.num_nodes=1).")
    return Job(cfg, ctx, dm, module, trainer, logger, method, pair)


def _fill_data_shape(cfg: DictConfig, shape: tuple[int, ...]) -> None:
    """A model node with ``data_shape: null`` (timm's) gets the data's C×H×W: its input size and channels follow
    the data. Written into the run's config, so sub-runs, sidecars and ``kdx.api`` rebuild the same network."""
    for node in (cfg.model, cfg.teacher.get("model")):
        if isinstance(node, DictConfig) and "data_shape" in node and node.data_shape is None:
            node.data_shape = [int(s) for s in shape]


def _heads(strategy: Strategy, student: Any, teacher: Optional[Teacher]) -> tuple[Any, Any]:
    """Each network's classifier when the strategy asks for it (``Strategy.needs_head``): ``get_classifier()``."""
    if not strategy.needs_head:
        return None, None
    heads = []
    for setting, net in (("model", student), ("teacher.model", teacher.network if teacher is not None else None)):
        try:
            heads.append(net.get_classifier())
        except AttributeError:
            raise ConfigError(f"{type(strategy).__name__} needs the classifier of {setting} (a get_classifier() method, "
                              "as kdx's zoo and timm models have); this network has none.") from None
    return heads[0], heads[1]


__all__ = ["Job", "RunContext", "build", "instantiate_data", "instantiate_unwrapped", "teacher_training_config"]
