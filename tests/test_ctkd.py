"""CTKD strategies (distill=ctkd, distill=ctkd_dkd): the learnable temperature through the strategy, its λ
curriculum, finite gradients, LS, and both methods through the real config."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, compose_cfg
from kdx.config import validate
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.ctkd import CTKD, CTKDDKD, dkd_loss_learnable_t, kd_loss_learnable_t
from kdx.distill.ls import Standardize, standardize
from kdx.errors import ConfigError
from kdx.run import build_job, run

PAIRS = ["res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1", "vgg13_vgg8",
         "res32x4_shuv1", "res32x4_shuv2", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2"]


def _logits(seed: int, b: int = 8, c: int = 10, teacher_scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g) * 2
    zt = torch.randn(b, c, generator=g) * teacher_scale
    y = torch.randint(0, c, (b,), generator=g)
    return zs, zt, y


def _terms(strategy, zs, zt, y, epoch: int = 1) -> dict[str, torch.Tensor]:
    batch = Batch(torch.zeros(len(y), 3, 2, 2), y, torch.arange(len(y)))
    return strategy(ModelOutput(zs), ModelOutput(zt), batch, epoch)


def _tau(strategy) -> float:
    """The strategy's current τ = t_start + t_range·σ(θ) (the GRL is the identity forward)."""
    with torch.no_grad():
        return strategy.global_temperature(0.0).item()


def _lambda_hand(e: int) -> float:
    """Official cosine schedule with max 0, min -1, 10 loops: λ(e) = -(1 - cos(π·min(e, 10)/10))/2."""
    return -(1 - math.cos(math.pi * min(e, 10) / 10)) / 2


# ---------------------------------------------------------------- the temperature through the strategy
@pytest.mark.parametrize("decay_min,ascends", [(-1.0, True), (1.0, False)])
def test_temperature_moves_as_the_gradient_reversal_dictates(decay_min, ascends):
    """λ(10) = decay_min. With the official λ = -1 the temperature *ascends* the KD loss (the student descends it);
    the same steps with λ = +1 (no reversal) descend it: the direction comes from the reversal layer alone."""
    zs, zt, y = _logits(0)
    s = CTKD(decay_min=decay_min)
    opt = torch.optim.SGD(s.parameters(), lr=0.5)
    tau0 = _tau(s)
    for _ in range(5):
        opt.zero_grad()
        sum(_terms(s, zs, zt, y, epoch=10).values()).backward()
        opt.step()
    tau1 = _tau(s)
    kd0, kd1 = kd_loss_learnable_t(zs, zt, tau0).item(), kd_loss_learnable_t(zs, zt, tau1).item()
    assert abs(tau1 - tau0) > 1e-3
    assert (kd1 > kd0) == ascends and (kd1 < kd0) == (not ascends)
    # the first step's direction: along +∂KD/∂τ with reversal, against it without
    t = torch.tensor(tau0, requires_grad=True)
    kd_loss_learnable_t(zs, zt, t).backward()
    assert (tau1 > tau0) == ((t.grad.item() > 0) == ascends)


def test_lambda_curriculum_over_epochs_1_to_12():
    """θ's gradient is λ(e)·∂(w_kd·KD)/∂θ with the official cosine λ; hand values λ(1) = -(1 - cos 18°)/2,
    λ(5) = -1/2, λ(e ≥ 10) = -1. The unreversed gradient comes from τ = 1 + 20σ(θ) built without the layer."""
    zs, zt, y = _logits(1)
    theta = torch.tensor([1.0], requires_grad=True)
    (0.9 * kd_loss_learnable_t(zs, zt, 1 + 20 * torch.sigmoid(theta))).backward()
    g1 = theta.grad.item()
    assert abs(g1) > 1e-4
    s = CTKD()
    for e in range(1, 13):
        s.zero_grad()
        sum(_terms(s, zs, zt, y, epoch=e).values()).backward()
        assert s.last_lambda == pytest.approx(_lambda_hand(e), abs=1e-15)
        assert s.global_temperature.global_t.grad.item() == pytest.approx(_lambda_hand(e) * g1, rel=1e-5, abs=1e-12)
    assert _lambda_hand(1) == pytest.approx(-0.0244717418524, abs=1e-12) and _lambda_hand(5) == pytest.approx(-0.5)
    assert _lambda_hand(10) == _lambda_hand(12) == -1.0
    # the official linear schedule (cosine_decay=false): λ(e) = -min(e, 9)/10, never reaching -1 (quirk kept)
    lin = CTKD(cosine_decay=False)
    for e, want in ((1, -0.1), (5, -0.5), (9, -0.9), (12, -0.9)):
        _terms(lin, zs, zt, y, epoch=e)
        assert lin.last_lambda == pytest.approx(want)


@pytest.mark.parametrize("cls", [CTKD, CTKDDKD])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_margin_teacher_gives_finite_gradients(cls, dtype):
    """Teacher rows with a 1000-logit margin: every teacher probability but one underflows at any τ ∈ (1, 21)
    (PyTorch 2's kl_div on probabilities gives a NaN τ-gradient there); everything stays finite."""
    zs, zt, y = _logits(2, b=16, c=100)
    zt[:, 0] += 1000.0
    zt[::2, 1] += 2000.0
    zs = zs.to(dtype).requires_grad_(True)
    s = cls()
    terms = _terms(s, zs, zt.to(dtype), y, epoch=3)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.values())
    sum(terms.values()).backward()
    theta_grad = s.global_temperature.global_t.grad
    assert torch.isfinite(theta_grad).all() and theta_grad.abs().item() > 0
    assert torch.isfinite(zs.grad).all()


def test_last_temperature_is_exposed_detached():
    zs, zt, y = _logits(3)
    s = CTKD()
    assert s.last_temperature is None and s.last_lambda is None
    _terms(s, zs, zt, y)
    t0 = s.last_temperature
    assert t0.shape == () and not t0.requires_grad and t0.dtype == torch.float32
    assert t0.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # θ = 1 at initialisation
    with torch.no_grad():
        s.global_temperature.global_t.fill_(-2.0)
    _terms(s, zs, zt, y)
    assert s.last_temperature.item() == pytest.approx(1 + 20 / (1 + math.exp(2)), rel=1e-6)
    assert t0.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # a value, not a view of θ


# ---------------------------------------------------------------- terms = the pure functions
def test_terms_equal_the_pure_functions():
    zs, zt, y = _logits(4)
    kd = CTKD()
    terms = _terms(kd, zs, zt, y)
    tau = kd.last_temperature
    assert set(terms) == {"ce", "kd"}
    assert torch.equal(terms["kd"], 0.9 * kd_loss_learnable_t(zs, zt, tau))  # τ's value: the same forward
    assert torch.equal(terms["ce"], 0.1 * F.cross_entropy(zs, y))
    dkd = CTKDDKD()
    terms = _terms(dkd, zs, zt, y)
    assert set(terms) == {"ce", "dkd"}
    assert torch.equal(terms["dkd"], dkd_loss_learnable_t(zs, zt, y, 1.0, 2.0, dkd.last_temperature))
    assert torch.equal(terms["ce"], F.cross_entropy(zs, y))  # w_ce 1 (-r 1), no warm-up: epoch 1 is full weight


def test_logit_standardisation_feeds_the_distillation_term_only():
    zs, zt, y = _logits(5)
    for s, name, fn in ((CTKD(logit_transform=Standardize()), "kd",
                         lambda a, b, t: 0.9 * kd_loss_learnable_t(a, b, t)),
                        (CTKDDKD(logit_transform=Standardize()), "dkd",
                         lambda a, b, t: dkd_loss_learnable_t(a, b, y, 1.0, 2.0, t))):
        terms = _terms(s, zs, zt, y)
        assert torch.equal(terms[name], fn(standardize(zs), standardize(zt), s.last_temperature))
        assert not torch.allclose(terms[name], fn(zs, zt, s.last_temperature))
        assert torch.equal(terms["ce"], s.w_ce * F.cross_entropy(zs, y))


@pytest.mark.parametrize("kwargs,key", [({"decay_loops": 0}, "distill.decay_loops"),
                                        ({"t_range": 0.0}, "distill.t_range"), ({"t_start": -1.0}, "distill.t_start")])
def test_bad_values_name_the_setting(kwargs, key):
    for cls in (CTKD, CTKDDKD):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            cls(**kwargs)


# ---------------------------------------------------------------- through the real config
def test_ctkd_end_to_end_temperature_trains_with_the_student(tmp_path, teacher_ckpt, one_thread):
    job = build_job(compose_cfg(TINY + ["distill=ctkd", f"teacher.ckpt={teacher_ckpt}", "logger=csv"], tmp_path))
    module, strategy = job.module, job.module.strategy
    theta = strategy.global_temperature.global_t
    theta0 = theta.detach().clone()
    teacher0 = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    job.trainer.fit(module, datamodule=job.datamodule)
    groups = job.trainer.optimizers[0].param_groups
    assert len(groups) == 1 and any(p is theta for p in groups[0]["params"])  # the student's group
    assert groups[0]["weight_decay"] == 5e-4
    assert not torch.equal(theta.detach(), theta0)
    assert all(torch.equal(teacher0[k], v) for k, v in module.teacher.state_dict().items())
    assert 1.0 < strategy.last_temperature.item() < 21.0 and strategy.last_lambda == pytest.approx(_lambda_hand(1))
    assert "strategy.global_temperature.global_t" in module.state_dict()  # saved in checkpoints
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    assert {"train/loss/ce", "train/loss/kd", "train/ctkd/temperature", "train/ctkd/lambda"} <= set(rows[0])
    logged = [r for r in rows if r["train/ctkd/temperature"]]
    assert logged and float(logged[-1]["train/ctkd/temperature"]) == pytest.approx(strategy.last_temperature.item())
    assert float(logged[-1]["train/ctkd/lambda"]) == pytest.approx(_lambda_hand(1))
    row = module.history[-1]  # the epoch's history row holds the last step's temperature and λ
    assert row["ctkd/temperature"] == pytest.approx(strategy.last_temperature.item())
    assert row["ctkd/lambda"] == pytest.approx(_lambda_hand(1))


@pytest.mark.parametrize("overrides,label,terms", [
    (["distill=ctkd_dkd"], "ctkd_dkd", {"ce", "dkd"}),
    (["distill=ctkd", "distill/logit_transform=ls"], "ctkd+ls", {"ce", "kd"}),
])
def test_ctkd_dkd_and_ls_run_through_the_config(tmp_path, teacher_ckpt, one_thread, overrides, label, terms):
    res = run(compose_cfg(TINY + overrides + [f"teacher.ckpt={teacher_ckpt}", "logger=csv"], tmp_path))
    assert res["status"] == "complete" and res["method"] == label
    header = next(csv.reader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    assert {h[len("train/loss/"):] for h in header if h.startswith("train/loss/")} == terms


@pytest.mark.parametrize("name", ["ctkd", "ctkd_dkd"])
def test_every_dkd_table_pair_composes(tmp_path, name):
    for pair in PAIRS:
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", f"distill={name}"], tmp_path)
        validate(cfg)
        assert cfg.distill._target_.startswith("kdx.distill.ctkd.") and cfg.method == name
    if name == "ctkd_dkd":  # the CTKD script's values, not the DKD recipe's (beta 8, warm-up 20)
        assert (cfg.distill.alpha, cfg.distill.beta, cfg.distill.w_ce) == (1.0, 2.0, 1.0)
        assert "warmup" not in cfg.distill
