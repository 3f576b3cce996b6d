"""Teacher-logit cache: ``teacher_cache=exact|augmented`` (``off`` by default).

Why: a frozen teacher gives the same logits for the same input, yet a live run recomputes them
every epoch; for a large teacher that is most of an epoch's forward work. The cache computes
them once, into a memory-mapped file, and reads them in every later epoch and run.

- ``exact``: one row per training sample, for runs whose training inputs never change
  (``data.augment=false``, or no crop padding and no flip). Random augmentation is refused.
- ``augmented``: ``V = teacher_cache.views`` fixed views per sample (crop offsets and flip,
  :func:`kdx.data.augment.view_params`). In epoch ``e`` sample ``i`` shows view
  ``draw_view(seed, e, i, V)``: the datamodule crops and flips the student's input with exactly
  that view's parameters (:meth:`ArrayDataModule.use_stored_views`) and the cache returns the
  teacher's logits on exactly those pixels. The augmentation is thus V views per image
  instead of a fresh crop per epoch: the price of never running the teacher again.

When: a pre-pass at fit start (``DistillModule.on_fit_start`` → :meth:`CachedTeacher.fill`) runs
the teacher over every missing row, in index order at the evaluation batch size, before epoch 1.
Not during epoch 1, because (a) ``augmented`` needs all V views before epoch 2 and an epoch
shows only one; (b) epoch 1 may not see every sample (``drop_last``, ``limit_train_batches``),
so epoch 2 would still call the teacher; (c) DDP ranks then own disjoint, contiguous rows
instead of the sampler's wrapped-around shards, which repeat samples. Its cost is one teacher
pass (V for ``augmented``) at a larger batch: what a live epoch 1 spends on the teacher.

Exactness: with ``teacher_cache.dtype=auto`` rows are stored in the live teacher's own output
dtype (float32 under ``trainer.precision=32-true``, bfloat16 under ``bf16-mixed``, float16 under
``16-mixed``), so nothing is rounded: a row is bit for bit the teacher's forward of that input
in the pre-pass, and the pre-pass runs under the training step's autocast and memory format.
(Convolutions are not batch-invariant: one sample's live logits may differ in the last bit
between two batches, 1 ulp on CPU float32; the cache is as exact as the live teacher is
reproducible.) ``cache_dtype=float16`` halves the file under 32-true; the loss then sees the
live logits rounded to float16 (cast back to the live dtype).

Validity: ``key.json`` beside the rows holds what the logits depend on: the teacher's weights
(sha256) and architecture; the data (name, class, subset, split seed, held-out split, size,
image shape, normalisation, a hash of the training split's pixels and labels); the transform
(augment, pad, flip, views); precision, storage dtype, device type, channels-last, compile. The folder is
``<teacher_cache.dir>/<dataset>/<arch>/<mode>-<hash of the key>``: changed settings get a new
folder (logged, naming what differs from the newest cache beside it); a ``key.json`` that does
not match is rebuilt in place (logged). Nothing is reused silently.

DDP: rank 0 prepares the files under a file lock (two jobs that need the same cache fill it
once), then each rank computes a contiguous share of the missing rows and writes only those
rows (logits, then their ``filled`` flags); after a barrier rank 0 checks every flag and writes
``complete.json``. ``teacher_cache.dir`` must be on a file system all ranks share.

Not for: feature methods (``afd``, ``rtk``: the cache holds logits only), ``teacher=reffakd`` (a
table lookup, nothing to save), data-free ``distill=nayer`` (no fixed inputs): each stops at
build naming ``teacher_cache=off``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from kdx.errors import ConfigError
from kdx.data.augment import VIEW_SEED, draw_view
from kdx.distill.base import ModelOutput
from kdx.io import atomic_write_json, file_lock, flatten
from kdx.teachers.base import Teacher

log = logging.getLogger(__name__)

MODES = ("off", "exact", "augmented")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16 as its bits
FORMAT = 1
KEY, LOGITS, FILLED, COMPLETE = "key.json", "logits.bin", "filled.bin", "complete.json"
DEVICE_TABLE_BYTES = 1 << 30  # tables up to this size are read from device memory, larger ones from the file
COMMIT_S = 30.0  # a long pre-pass marks its rows filled this often, so an interrupted one resumes


@dataclass
class CacheSettings:
    """The ``teacher_cache`` node: ``mode`` (off | exact | augmented), ``views`` (per sample; 1 for exact),
    ``dtype`` (auto | float32 | float16 | bfloat16) and ``dir`` (the cache's root folder)."""

    mode: str = "off"
    views: int = 1
    dtype: str = "auto"
    dir: Optional[str] = None

    def __post_init__(self) -> None:
        self.mode = "off" if self.mode in (None, False) else str(self.mode)  # YAML reads a bare `off` as false
        if self.mode not in MODES:
            raise ConfigError(f"teacher_cache.mode={self.mode!r} is not one of {', '.join(MODES)} (teacher_cache=...).")
        if int(self.views) < 1:
            raise ConfigError(f"teacher_cache.views={self.views}: at least 1 view per sample.")
        if self.mode == "exact" and int(self.views) != 1:
            raise ConfigError(f"teacher_cache.views={self.views} with teacher_cache=exact (one view per sample); "
                              "use teacher_cache=augmented for several views.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"teacher_cache.dtype={self.dtype!r} is not one of auto, {', '.join(DTYPES)}.")
        if self.mode != "off" and not self.dir:
            raise ConfigError("teacher_cache.dir is not set: the folder where the cache's files go.")
        self.views = int(self.views)

    @property
    def root(self) -> Path:
        return Path(str(self.dir)).expanduser()

    def checked(self, strategy: Any, source: Any, dm: Any, regime: str) -> Optional["CacheSettings"]:
        """The settings this run uses (None: no cache); raises :class:`ConfigError` naming the setting to change.

        Called by the composition root before the teacher is loaded (or trained), so a wrong combination stops
        at once. ``source`` is the teacher source's class, ``regime`` the module's.
        """
        if self.mode == "off":
            return None
        if not strategy.needs_teacher:
            log.info("teacher_cache=%s: %s uses no teacher, nothing to cache.", self.mode, type(strategy).__name__)
            return None
        what = f"teacher_cache={self.mode}"
        if regime != "distill":
            raise ConfigError(f"{what} does not apply to the {regime} regime (module={regime}): its teacher sees "
                              "generated images, never the same twice. Set teacher_cache=off.")
        if strategy.views:
            raise ConfigError(
                f"{what}: {type(strategy).__name__} shows the teacher {len(strategy.views)} extra view(s) of every sample "
                f"({', '.join(strategy.views)}), drawn anew every epoch; the cache holds one. Set teacher_cache=off."
            )
        if strategy.needs_features:
            raise ConfigError(
                f"{what}: {type(strategy).__name__} needs the teacher's intermediate features, but the cache holds "
                "logits only. Set teacher_cache=off (the cache serves logit methods: kd, kd_crd, dkd, topkd)."
            )
        if not source.has_network:
            raise ConfigError(f"{what}: this teacher is a table of soft labels, not a network; set teacher_cache=off.")
        random = dm.random_augmentation
        if self.mode == "exact" and random:
            raise ConfigError(
                "teacher_cache=exact stores one teacher output per training sample, but data.augment=true gives the "
                "samples a new random crop/flip every epoch. Set data.augment=false (fixed inputs), or "
                "teacher_cache=augmented (a fixed set of teacher_cache.views views per sample)."
            )
        if self.mode == "augmented":
            if not dm.supports_stored_views:
                raise ConfigError(
                    f"teacher_cache=augmented needs a dataset held as uint8 arrays (cifar10, cifar100, svhn, "
                    f"fashion_mnist, synthetic, array files); data={dm.name} ({type(dm).__name__}) augments in loader "
                    "workers. Use data.augment=false with teacher_cache=exact, or teacher_cache=off."
                )
            if not random:
                log.info("teacher_cache=augmented without random augmentation: one view per sample, as "
                         "teacher_cache=exact.")
                return replace(self, mode="exact", views=1)
        return self


class CachedTeacher(Teacher):
    """A network teacher whose training-split logits come from the cache (see the module docstring).

    ``forward(x, y, idx)`` looks rows up by ``idx`` (and, for ``augmented``, the view of the
    current epoch, set by :meth:`set_epoch`); ``live`` is the wrapped teacher, which evaluation
    (the teacher's own accuracy) uses. :meth:`fill` must run first, on every rank.
    """

    def __init__(
        self,
        teacher: Teacher,
        settings: CacheSettings,
        datamodule: Any,
        dataset_key: str,
        precision: str = "32-true",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.live = teacher
        self.settings = settings
        self.dm = datamodule
        self.dataset_key = dataset_key
        self.precision = str(precision)
        self.channels_last = bool(channels_last)
        self.measures_accuracy = teacher.measures_accuracy
        self.known_acc1 = teacher.known_acc1
        self.info = {**teacher.info, "cache": {"mode": settings.mode, "views": settings.views}}
        self.epoch = 0
        self.folder: Optional[Path] = None
        self._table: Optional[Tensor] = None
        self._live_dtype = torch.float32
        self.rows_computed = 0
        self.compiled = False
        if settings.mode == "augmented":
            datamodule.use_stored_views(settings.views)

    def train(self, mode: bool = True) -> "CachedTeacher":
        return super().train(False)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``perf.compile``: compile the network (the lookup gains nothing); compiled logits get their own key."""
        self.live.compile(*args, **kwargs)
        self.compiled = True

    def for_evaluation(self) -> Teacher:
        return self.live  # the cache holds training-split logits only

    @property
    def network(self) -> Optional[torch.nn.Module]:
        return self.live.network

    def set_epoch(self, epoch: int) -> None:
        """The 0-based training epoch, which picks each sample's view (as the datamodule does)."""
        self.epoch = int(epoch)

    def rows(self, idx: Tensor, epoch: int) -> Tensor:
        """Cache rows of samples ``idx`` in ``epoch``: ``idx * V + view``."""
        idx = idx.to(torch.int64)
        v = self.settings.views
        return idx if v == 1 else idx * v + draw_view(self.dm.seed, epoch, idx, v)

    @torch.no_grad()
    def forward(self, x: Tensor, y: Optional[Tensor] = None, idx: Optional[Tensor] = None) -> ModelOutput:
        if self._table is None:
            raise RuntimeError(
                "The teacher-logit cache was read before CachedTeacher.fill(trainer) ran (DistillModule runs it at "
                "fit start). Set teacher_cache=off to use the live teacher."
            )
        if idx is None:
            raise ValueError("The teacher-logit cache looks logits up by sample index: pass idx.")
        rows = self.rows(idx, self.epoch).to(self._table.device)
        return ModelOutput(self._table[rows].to(device=x.device, dtype=self._live_dtype))

    def metrics(self) -> dict[str, float]:
        """Logged with each validation: rows the teacher computed for the cache in this run (0: a warm cache)."""
        return {"teacher/cache_rows_computed": float(self.rows_computed)}

    # ------------------------------------------------------------------ filling
    def _inputs(self, idx: Tensor, view: int, device: torch.device, batch: Any = None) -> Tensor:
        """The teacher's input for samples ``idx`` (view ``view``), as the training step sees it."""
        dm = self.dm
        if batch is None:
            batch = dm.train_dataset[idx.tolist()]
        x, y, i = (t.to(device) for t in batch)
        if self.settings.mode == "augmented":
            return dm.transform_view_batch((x, y, i), view)[0]
        return dm.transform_batch((x, y, i), train=True, epoch=0)[0]

    def _live(self, x: Tensor) -> Tensor:
        """The live teacher's logits on its own view of ``x`` (as the training step calls it)."""
        return self.live(self.live.adapt_input(x)).logits

    def key(self, dtype: torch.dtype, num_classes: int, device: torch.device) -> dict[str, Any]:
        """What the cached logits depend on (stored as ``key.json``; its hash names the folder)."""
        dm, ds = self.dm, self.dm.train_dataset
        transform: dict[str, Any] = {"augment": bool(dm.augment)}
        if dm.augment:
            transform.update(pad=int(dm.pad), hflip=bool(dm.hflip))
        if self.settings.mode == "augmented":
            transform.update(views=self.settings.views, view_seed=VIEW_SEED)
        return {
            "format": FORMAT,
            "mode": self.settings.mode,
            "teacher": {"arch": self.live.info.get("arch"), "sha256": self.live.info.get("sha256"),
                        **({"input": self.live.info["input"]} if "input" in self.live.info else {})},
            "data": {
                "name": dm.name, "key": self.dataset_key, "class": type(dm).__name__, "split": "train",
                "subset": dm.subset, "val_split": dm.val_split, "split_seed": dm.split_seed, "size": len(ds),
                "image_shape": list(dm.image_shape), "image_size": dm.image_size,
                "mean": [float(m) for m in dm.mean], "std": [float(s) for s in dm.std],
                "fingerprint": dm.train_fingerprint(),
            },
            "transform": transform,
            "precision": self.precision,
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "channels_last": self.channels_last,
            "compiled": self.compiled,
            "rows": len(ds) * self.settings.views,
            "classes": int(num_classes),
        }

    def fill(self, trainer: Any, prep: Callable[[Tensor], Tensor] = lambda x: x) -> None:
        """Compute the missing rows (this rank's share), then read the table; every rank calls this.

        ``prep`` is what the training step applies to inputs before the teacher (channels-last).
        """
        t0 = time.time()
        strategy = trainer.strategy
        rank, world, device = int(trainer.global_rank), int(trainer.world_size), strategy.root_device
        precision_ctx = trainer.precision_plugin.train_step_context
        n, views = len(self.dm.train_dataset), self.settings.views
        with precision_ctx():  # the live output dtype and class count, from the first two samples
            probe = self._live(prep(self._inputs(torch.arange(min(2, n)), 0, device)))
        self._live_dtype = probe.dtype
        dtype = probe.dtype if self.settings.dtype == "auto" else DTYPES[self.settings.dtype]
        key = self.key(dtype, probe.shape[1], device)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.settings.root / _safe(self.dataset_key) / _safe(str(key["teacher"]["arch"])) / f"{key['mode']}-{digest}"
        self.folder = folder
        with file_lock(folder.parent / f".{folder.name}.lock") if rank == 0 else nullcontext():
            if rank == 0:
                _prepare_files(folder, key, dtype)
            strategy.barrier("kdx_teacher_cache_open")
            if not (folder / KEY).is_file():
                raise RuntimeError(
                    f"Rank {rank} cannot see the teacher-logit cache {folder} that rank 0 created: teacher_cache.dir "
                    "must be on a file system every process shares (or set teacher_cache=off)."
                )
            filled = np.memmap(folder / FILLED, np.uint8, "r+", shape=(key["rows"],))
            missing = np.flatnonzero(filled == 0)
            strategy.barrier("kdx_teacher_cache_plan")  # every rank has read the same plan before anyone writes
            mine = np.array_split(missing, world)[rank]
            if rank == 0 and len(missing):
                log.info("Teacher-logit cache: computing %d of %d rows (%s) into %s", len(missing), key["rows"],
                         f"{views} views per sample" if views > 1 else "one per sample", folder)
            self._compute(folder, key, dtype, filled, mine, device, prep, precision_ctx)
            del filled
            strategy.barrier("kdx_teacher_cache_filled")
            if rank == 0:
                _finish(folder, key)
            strategy.barrier("kdx_teacher_cache_done")
        self.rows_computed = int(strategy.reduce(torch.tensor(float(len(mine)), device=device), reduce_op="sum"))
        self._table = _read_table(folder, key, dtype, device)
        fill_s = time.time() - t0
        self.resources = {"teacher_cache_fill_s": round(fill_s, 2), "teacher_cache_rows_computed": self.rows_computed}
        self.info["cache"] = {**self.info["cache"], "path": str(folder), "dtype": key["dtype"], "rows": key["rows"],
                              "rows_computed": self.rows_computed, "fill_s": round(fill_s, 2)}
        if rank == 0:
            log.info("Teacher-logit cache %s: %d rows ready (%d computed in this run, %.1f s)", folder, key["rows"],
                     self.rows_computed, fill_s)

    @torch.no_grad()
    def _compute(self, folder, key, dtype, filled, rows: np.ndarray, device, prep, precision_ctx) -> None:
        """Teacher logits of ``rows`` into the file; their ``filled`` flags follow each flushed part."""
        if len(rows) == 0:
            return
        views, bs = self.settings.views, int(self.dm.eval_batch_size)
        logits = np.memmap(folder / LOGITS, _NUMPY[dtype], "r+", shape=(key["rows"], key["classes"]))
        todo: list[tuple[int, Tensor]] = []
        rows_t = torch.from_numpy(rows)
        for v in range(views):
            samples = rows_t[rows_t % views == v] // views
            todo += [(v, chunk) for chunk in samples.split(bs)]
        loader = torch.utils.data.DataLoader(
            self.dm.train_dataset, batch_size=None, sampler=[c.tolist() for _, c in todo],
            num_workers=int(self.dm.num_workers),
        )
        pending: list[np.ndarray] = []
        last = time.time()
        for (v, chunk), batch in zip(todo, loader):
            with precision_ctx():
                out = self._live(prep(self._inputs(chunk, v, device, batch)))
            out = out.to(dtype).cpu()
            r = (chunk * views + v).numpy()
            logits[r] = (out.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else out.numpy())
            pending.append(r)
            if time.time() - last > COMMIT_S:
                _commit(logits, filled, pending)
                pending, last = [], time.time()
        _commit(logits, filled, pending)


# ---------------------------------------------------------------------------------------- files
def _safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in part)


def key_diff(old: Optional[dict], new: dict) -> str:
    """``"teacher.sha256: 1a2b… → 3c4d…, transform.pad: 4 → 2"``: what differs between two keys."""
    a, b = flatten(old or {}), flatten(new)
    short = lambda v: (v[:12] + "…") if isinstance(v, str) and len(v) > 14 else v  # noqa: E731
    return ", ".join(f"{k}: {short(a.get(k))} → {short(b.get(k))}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def _read_key(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _prepare_files(folder: Path, key: dict, dtype: torch.dtype) -> None:
    """Rank 0, under the lock: reuse the folder's files when their key matches, else (re)create them."""
    rows, classes = key["rows"], key["classes"]
    nbytes = rows * classes * np.dtype(_NUMPY[dtype]).itemsize
    old = _read_key(folder / KEY) if (folder / KEY).is_file() else None
    if old == key and _size(folder / LOGITS) == nbytes and _size(folder / FILLED) == rows:
        if not (folder / COMPLETE).is_file():
            done = int(np.count_nonzero(np.memmap(folder / FILLED, np.uint8, "r", shape=(rows,))))
            log.info("Teacher-logit cache %s: resuming an unfinished fill (%d of %d rows present)", folder, done, rows)
        return
    if (folder / KEY).is_file():
        log.warning("Teacher-logit cache %s does not match this run (%s): rebuilding it.", folder,
                    key_diff(old, key) or "file sizes differ")
    else:
        near = _newest_sibling(folder)
        if near is not None:
            log.info("Teacher-logit cache: none for these settings; building %s (the newest cache beside it, %s, "
                     "was made with %s)", folder, near[0].name, key_diff(near[1], key))
        else:
            log.info("Teacher-logit cache: none for these settings; building %s", folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (COMPLETE, KEY, LOGITS, FILLED):
        (folder / name).unlink(missing_ok=True)
    np.memmap(folder / LOGITS, _NUMPY[dtype], "w+", shape=(rows, classes)).flush()
    np.memmap(folder / FILLED, np.uint8, "w+", shape=(rows,)).flush()
    atomic_write_json(folder / KEY, key)  # last: a key.json means the files exist at their full size


def _newest_sibling(folder: Path) -> Optional[tuple[Path, dict]]:
    found = []
    for cand in folder.parent.glob("*/" + KEY):
        if cand.parent != folder and (k := _read_key(cand)) is not None:
            found.append((cand.stat().st_mtime, cand.parent, k))
    if not found:
        return None
    _, path, k = max(found, key=lambda t: t[0])
    return path, k


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1


def _commit(logits: np.memmap, filled: np.memmap, pending: list[np.ndarray]) -> None:
    """Rows reach the file before their flags do: an interrupted fill recomputes, never reads, a partial row."""
    if not pending:
        return
    logits.flush()
    filled[np.concatenate(pending)] = 1
    filled.flush()


def _finish(folder: Path, key: dict) -> None:
    filled = np.memmap(folder / FILLED, np.uint8, "r", shape=(key["rows"],))
    missing = int(key["rows"] - np.count_nonzero(filled))
    if missing:
        raise RuntimeError(f"Teacher-logit cache {folder}: {missing} rows were not filled by any rank.")
    if not (folder / COMPLETE).is_file():
        atomic_write_json(folder / COMPLETE, {"rows": key["rows"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _read_table(folder: Path, key: dict, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The rows as a tensor: in device memory when small, else the file's mapping (read on demand)."""
    shape = (key["rows"], key["classes"])
    arr = np.memmap(folder / LOGITS, _NUMPY[dtype], "c", shape=shape)  # copy-on-write: writable, never written
    small = arr.nbytes <= DEVICE_TABLE_BYTES
    table = torch.from_numpy(np.array(arr) if small else arr)
    if dtype == torch.bfloat16:
        table = table.view(torch.bfloat16)
    return table.to(device) if small else table
