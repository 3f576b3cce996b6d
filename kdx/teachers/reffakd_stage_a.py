"""ReffAKD stage A (docs/methods.md, ReffAKD, steps A and B): the autoencoder and the soft-label table.

``python -m kdx task=reffakd_ae teacher=reffakd data=cifar100`` (settings under ``teacher.ae.*``):

1. Train :class:`ReffAE` (the official 47,355-parameter autoencoder) with MSE between the
   reconstruction and the *normalised* input (per-channel mean/std of this training split; the
   decoder ends in a sigmoid, a quirk of the official code kept as is: the sigmoid cannot reach the
   negative half of its target, saturates towards 0 and can stay at the all-zero output's MSE;
   ``teacher.ae.recon_target=pixels`` compares it with ``x/255`` instead). SGD lr 0.1, momentum 0.9,
   wd 5e-4, batch 128, 200 epochs, MultiStepLR [60, 120, 160] γ 0.2, RandomCrop(32, 4) + flip +
   RandomRotation(15°) (``pad`` 0: the flip and rotation without a crop, as the Fashion-MNIST and
   Tiny-ImageNet notebooks); the weights with the best test MSE are kept, and the test MSE of an
   all-zero output is recorded beside it (how far the AE got from its initial plateau). A plain
   PyTorch loop (the model is tiny); augmentation is a function of ``(seed, epoch, index)`` like
   kdx's datamodules.
2. Pick ``samples_per_class`` (40) samples of every class with ``random.Random(selection_seed)``
   (42), embed them with the encoder (768-d for 32×32) — augmented as the official code does
   (``embed_augmented``, default) with the augmentation draw of epoch ``epochs`` — and build
   ``A = class_similarity(...)`` and ``Q = soft_labels(A)`` (its flatness and label-smoothing
   equivalent recorded: :func:`kdx.teachers.reffakd_stats.table_stats`). Only the selected samples are
   embedded: the official code embeds the whole training set and then picks, which gives the same
   embeddings for the picked samples here (our augmentation does not depend on the order).
3. Save the artifact ``paths.teachers/<dataset>/reffakd-<hash of the settings>/`` (``ae.pt``,
   ``table.pt`` = {A, Q}, ``reffakd.json`` with settings and timings, ``similarity.png``), atomically,
   and the heat-map of ``A`` in the run folder (logged to W&B with the W&B logger).

A kdx task (``task=reffakd_ae``, dispatched by :mod:`kdx.run`); a ReffAKD teacher whose table is missing runs it
through the run context. It takes the store entry's lock for the whole build, so concurrent jobs build it once.
"""
from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from kdx.build import instantiate_data, instantiate_unwrapped
from kdx.config import resolved, validate
from kdx.data.augment import apply_crop_flip, crop_flip_params, hash_uniform32
from kdx.errors import ConfigError
from kdx.io import atomic_path, atomic_torch_save, atomic_write_json, sha256_file
from kdx.loggers import build_logger, close_logger
from kdx.results import git_revision
from kdx.teachers.reffakd_stats import table_stats
from kdx.teachers.reffakd_table import (
    AE_WEIGHTS, HEATMAP, META, TABLE, AESettings, artifact_complete, artifact_name, class_similarity, settings_hash,
    soft_labels,
)
from kdx.teachers.store import TeacherStore

log = logging.getLogger("kdx")

class ReffAE(nn.Module):
    """The official ReffAKD autoencoder: 3 stride-2 convs (12, 24, 48 channels) and their mirror.

    ``encode(x)`` is the flattened ``[B, 48·H/8·W/8]`` embedding (768-d for 32×32).
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 12, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(12, 24, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(24, 48, 4, stride=2, padding=1), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(48, 24, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(24, 12, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(12, in_channels, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------ augmentation


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of ``x`` ``[B, C, H, W]`` about its centre (nearest, zero fill, no expand)."""
    theta = degrees.to(torch.float32) * (math.pi / 180.0)
    c, s = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(c)
    mat = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1).to(x.device)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)


def rotation_degrees(seed: int, epoch: int, idx: Tensor, max_degrees: float) -> Tensor:
    """Per-sample angles uniform in ``[-max, max]`` from the ``(seed, epoch, idx)`` hash (stream 3)."""
    u = hash_uniform32(seed, epoch, idx, 3).to(torch.float64) / 2.0**32
    return ((2.0 * u - 1.0) * float(max_degrees)).to(torch.float32)


def augment(x_uint8: Tensor, idx: Tensor, seed: int, epoch: int, pad: int, rotation: float) -> Tensor:
    """RandomCrop(pad) + HorizontalFlip + RandomRotation(rotation) of a uint8 batch → float in [0, 255]; ``pad`` 0
    flips only (the Tiny-ImageNet and Fashion-MNIST notebooks: flip + rotation, no crop)."""
    dx, dy, flip = crop_flip_params(seed, epoch, idx, pad)
    x = apply_crop_flip(x_uint8, dx, dy, flip, pad).float()
    if rotation:
        x = rotate(x, rotation_degrees(seed, epoch, idx, rotation))
    return x


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Float pixels in [0, 255] → ``(x/255 − mean)/std`` per channel."""
    return (x / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def pixel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and std (of pixel/255) of a uint8 ``[N, C, H, W]`` tensor."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), 8192):
        b = x[i:i + 8192].to(torch.float64) / 255.0
        s += b.sum(dim=(0, 2, 3))
        s2 += (b * b).sum(dim=(0, 2, 3))
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / m
    return mean.float(), (s2 / m - mean**2).clamp_min(0).sqrt().float()


# ------------------------------------------------------------------------------------------ training


def _device(cfg: DictConfig) -> torch.device:
    acc = str(cfg.get("trainer", {}).get("accelerator", "auto"))
    if acc == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _arrays(dm: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train, test = dm.train_dataset, dm.test_dataset
    if not dm.in_memory:
        raise ConfigError(
            f"ReffAKD stage A needs an in-memory datamodule (uint8 arrays); data={dm.name} "
            f"({type(dm).__name__}) does not provide one. Use an array-backed data config."
        )
    x = train.x
    if x.shape[-1] % 8 or x.shape[-2] % 8:
        raise ValueError(
            f"The ReffAKD autoencoder halves the image three times: image sides must be multiples of 8, "
            f"data={dm.name} has {tuple(x.shape[-2:])}."
        )
    return train.x, train.y, test.x, test.y


def recon_target(x: Tensor, xn: Tensor, target: str) -> Tensor:
    """What the reconstruction is compared with: the normalised input ``xn`` (official) or the pixels ``x/255``."""
    return xn if target == "normalised" else x / 255.0


@torch.no_grad()
def test_mse(ae: Optional[ReffAE], x: Tensor, mean: Tensor, std: Tensor, batch: int, device: torch.device,
             target: str = "normalised") -> float:
    """MSE of the reconstruction against its target (:func:`recon_target`); ``ae`` None: of an all-zero output."""
    if ae is not None:
        ae.eval()
    total, n = 0.0, 0
    for i in range(0, len(x), batch):
        xf = x[i:i + batch].to(device).float()
        xn = normalise(xf, mean, std)
        t = recon_target(xf, xn, target)
        total += float(F.mse_loss(ae(xn) if ae is not None else torch.zeros_like(t), t, reduction="sum"))
        n += t.numel()
    return total / max(n, 1)


def train_autoencoder(
    x_train: Tensor, x_test: Tensor, s: dict[str, Any], device: torch.device, logger: Any = None
) -> tuple[ReffAE, dict[str, Any]]:
    """Train the AE with the official recipe; returns the best-test-MSE model and a record."""
    torch.manual_seed(int(s["seed"]))
    mean, std = (t.to(device) for t in pixel_stats(x_train))
    ae = ReffAE(x_train.shape[1]).to(device)
    opt = torch.optim.SGD(ae.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(s["milestones"]), gamma=s["gamma"])
    n, bs = len(x_train), int(s["batch_size"])
    best = {"mse": float("inf"), "epoch": None, "state": None}
    history = []
    t0 = time.time()
    for epoch in range(int(s["epochs"])):
        ae.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(s["seed"]) * 100003 + epoch))
        run_loss, seen = 0.0, 0
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            xf = augment(x_train[idx].to(device), idx.to(device), int(s["seed"]), epoch, int(s["pad"]),
                         float(s["rotation"]))
            xb = normalise(xf, mean, std)
            loss = F.mse_loss(ae(xb), recon_target(xf, xb, s["recon_target"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
        sched.step()
        mse = test_mse(ae, x_test, mean, std, int(s["eval_batch_size"]), device, s["recon_target"])
        row = {"epoch": epoch + 1, "train_mse": run_loss / max(seen, 1), "test_mse": mse}
        history.append(row)
        if logger is not None:
            logger.log_metrics({"ae/train_mse": row["train_mse"], "ae/test_mse": mse}, step=epoch + 1)
        if mse < best["mse"]:
            best = {"mse": mse, "epoch": epoch + 1, "state": copy.deepcopy(ae.state_dict())}
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == int(s["epochs"]):
            log.info("ReffAKD AE epoch %d/%d: train MSE %.5f, test MSE %.5f", epoch + 1, s["epochs"], row["train_mse"], mse)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ae.load_state_dict(best["state"])
    record = {
        "ae_train_time_s": round(time.time() - t0, 3),
        "best_test_mse": best["mse"],
        "best_epoch": best["epoch"],
        "zero_output_test_mse": test_mse(None, x_test, mean, std, int(s["eval_batch_size"]), device,
                                         s["recon_target"]),
        "history": history,
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    return ae, record


def select_per_class(labels: Tensor, num_classes: int, per_class: int, seed: int) -> Tensor:
    """``per_class`` sample positions of every class (in class order), ``random.Random(seed).sample``."""
    rng = random.Random(int(seed))
    y = labels.tolist()
    pools: list[list[int]] = [[] for _ in range(num_classes)]
    for i, c in enumerate(y):
        pools[c].append(i)
    picked: list[int] = []
    for c, pool in enumerate(pools):
        if len(pool) < per_class:
            raise ValueError(
                f"Class {c} has {len(pool)} training samples, fewer than teacher.ae.samples_per_class={per_class}. "
                "Lower teacher.ae.samples_per_class or use more data (data.subset)."
            )
        picked += rng.sample(pool, per_class)
    return torch.tensor(picked, dtype=torch.int64)


@torch.no_grad()
def embed(ae: ReffAE, x: Tensor, idx: Tensor, s: dict[str, Any], mean: Tensor, std: Tensor, device: torch.device) -> Tensor:
    """Encoder embeddings of samples ``idx`` (augmented with the epoch-``epochs`` draw when ``embed_augmented``)."""
    ae.eval()
    out = []
    bs = int(s["eval_batch_size"])
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        xb = x[j].to(device)
        if s["embed_augmented"]:
            xb = augment(xb, j.to(device), int(s["seed"]), int(s["epochs"]), int(s["pad"]), float(s["rotation"]))
        out.append(ae.encode(normalise(xb.float(), mean, std)).cpu())
    return torch.cat(out)


def save_heatmap(A: Tensor, class_names: list[str], path: Path, title: str = "") -> Path:
    """Heat-map of ``A`` (classes in order; tick labels = class names when C ≤ 100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = A.shape[0]
    size = min(max(6.0, 0.13 * c), 16.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(A.cpu().numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if c <= 100:
        fs = max(3.0, min(9.0, 500.0 / c))
        ax.set_xticks(range(c))
        ax.set_yticks(range(c))
        ax.set_xticklabels(class_names[:c], rotation=90, fontsize=fs)
        ax.set_yticklabels(class_names[:c], fontsize=fs)
    ax.set_title(title or "ReffAKD class similarity A")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ stage A


def build_artifact(cfg: DictConfig, output_dir: Optional[Path] = None) -> dict[str, Any]:
    """Stage A: train the AE, build ``A`` and ``Q``, save the artifact; returns the stage's results.

    The whole build holds the store entry's lock; an artifact that is complete when the lock is taken (another
    job built it meanwhile) is not built again (the results say ``skipped``).
    """
    if cfg.teacher.get("ae") is None:
        raise ConfigError(
            "task=reffakd_ae trains the ReffAKD autoencoder configured by the reffakd teacher: add teacher=reffakd "
            "(its settings are teacher.ae.*)."
        )
    settings: AESettings = instantiate_unwrapped(cfg.teacher.ae)
    s = settings.as_dict()
    out = Path(output_dir or cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dm = instantiate_data(cfg.data)
    key, num_classes = dm.dataset_key, int(dm.num_classes)
    name = artifact_name(settings)
    store = TeacherStore(cfg.paths.teachers)
    entry = store.entry_dir(key, name)
    with store.lock(key, name):
        if artifact_complete(entry):
            log.info("ReffAKD stage A: the table %s is complete (built by another job): not built again.", entry)
            return {"status": "complete", "task": "reffakd_ae", "artifact": str(entry), "skipped": True}
        return _build(cfg, dm, settings, s, out, key, num_classes, entry)


def _build(cfg: DictConfig, dm: Any, settings: AESettings, s: dict[str, Any], out: Path, key: str, num_classes: int,
           entry: Path) -> dict[str, Any]:
    x_train, y_train, x_test, _ = _arrays(dm)
    device = _device(cfg)
    info = {"method": "reffakd_ae", "dataset": key, "pair": "reffakd_ae", "seed": int(s["seed"])}
    logger = build_logger(cfg, info)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    log.info("ReffAKD stage A on %s (%d training images, %s): %s epochs → %s", key, len(x_train), device,
             s["epochs"], entry)
    try:
        if logger is not None:
            logger.log_hyperparams({"teacher": {"ae": s}, "data": OmegaConf.to_container(cfg.data, resolve=True)})
        ae, record = train_autoencoder(x_train, x_test, s, device, logger)
        t1 = time.time()
        picked = select_per_class(y_train, num_classes, int(s["samples_per_class"]), int(s["selection_seed"]))
        mean, std = torch.tensor(record["mean"], device=device), torch.tensor(record["std"], device=device)
        emb = embed(ae, x_train, picked, s, mean, std, device)
        t_embed = time.time() - t1
        A = class_similarity(emb, y_train[picked], num_classes, float(s["diag_bonus"]))
        Q = soft_labels(A)
        build_time = time.time() - t1
        class_names = list(dm.class_names)
        png = save_heatmap(A, class_names, out / HEATMAP, f"ReffAKD class similarity A ({key})")
        if logger is not None and type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.log({"reffakd/similarity": wandb.Image(str(png))})
        meta = {
            "kind": "reffakd",
            "dataset": key,
            "num_classes": num_classes,
            "class_names": class_names,
            "settings": s,
            "settings_hash": settings_hash(settings),
            "ae_params": num_params(ae),
            "embedding_dim": int(emb.shape[1]),
            "ae_train_time_s": record["ae_train_time_s"],
            "embed_time_s": round(t_embed, 3),
            "soft_label_build_time_s": round(build_time, 3),
            "best_test_mse": record["best_test_mse"],
            "best_epoch": record["best_epoch"],
            "zero_output_test_mse": record["zero_output_test_mse"],
            "table_stats": table_stats(Q),
            "normalisation": {"mean": record["mean"], "std": record["std"]},
            "num_selected": int(len(picked)),
            "device": str(device),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "git": git_revision(),
        }
        entry.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({k: v.detach().cpu() for k, v in ae.state_dict().items()}, entry / AE_WEIGHTS)
        atomic_torch_save({"A": A.cpu(), "Q": Q.cpu()}, entry / TABLE)
        with atomic_path(entry / HEATMAP) as tmp:
            shutil.copyfile(png, tmp)
        meta.update(table_sha256=sha256_file(entry / TABLE), ae_sha256=sha256_file(entry / AE_WEIGHTS))
        atomic_write_json(entry / META, meta)  # last: its presence marks a complete artifact
    except BaseException:
        close_logger(logger, "failed")
        raise
    results = {
        "status": "complete",
        "task": "reffakd_ae",
        "method": "reffakd_ae",
        "dataset": key,
        "data": dm.describe(),
        "artifact": str(entry),
        "heatmap": str(out / HEATMAP),
        **{k: meta[k] for k in ("settings", "settings_hash", "ae_params", "embedding_dim", "best_test_mse",
                                "best_epoch", "zero_output_test_mse", "table_stats", "num_selected", "device")},
        "resources": {k: meta[k] for k in ("ae_params", "ae_train_time_s", "embed_time_s", "soft_label_build_time_s")},
        "started": started,
        "git": meta["git"],
        "output_dir": str(out),
        "history": record["history"],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_json(out / "results.json", results)
    close_logger(logger, "success")
    st = meta["table_stats"]
    log.info("ReffAKD stage A done: AE %d params, best test MSE %.5f (epoch %s; an all-zero output: %.5f), %.1f s; "
             "table %s: row entropy %.3f of log C, Q[y, y] %.4f on average (label smoothing ε %.3f)",
             meta["ae_params"], meta["best_test_mse"], meta["best_epoch"], meta["zero_output_test_mse"],
             meta["ae_train_time_s"], entry, st["entropy_rel_mean"], st["true_class_prob_mean"],
             st["label_smoothing_equivalent"])
    return results


def run_stage_a(cfg: DictConfig) -> dict[str, Any]:
    """``task=reffakd_ae``: validate the config, then :func:`build_artifact` in the run folder."""
    validate(cfg)
    cfg = resolved(cfg)
    return build_artifact(cfg, Path(cfg.paths.output_dir))
