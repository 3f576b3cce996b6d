"""ReffAKD as its authors ran it on each dataset: the soft term (batch-mean soft CE vs nn.KLDivLoss's mean over
B·C), the similarity diagonal bonus, the per-dataset recipes, and the numbers that explain a table (autoencoder MSE
against an all-zero output, row entropy, label-smoothing equivalents)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY, compose_cfg
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.losses import reffakd_loss, reffakd_terms
from kdx.distill.reffakd import ReffAKD
from kdx.errors import ConfigError
from kdx.teachers.reffakd_stage_a import augment, normalise
from kdx.teachers.reffakd_stage_a import test_mse as ae_test_mse
from kdx.teachers.reffakd_stats import equivalent_smoothing, main, smoothing_at_optimum, table_stats
from kdx.teachers.reffakd_table import AESettings, artifact_name, class_similarity


# ------------------------------------------------------------------------------------------------ the soft term


def test_kldiv_mean_divides_by_batch_times_classes_hand_value():
    """Student logits 0 → p = 1/3 everywhere. q rows [½, ¼, ¼] (entropy 1.5·ln 2) and [1, 0, 0] (entropy 0).
    batchmean_ce: T²·(1/B)·Σ_b ln 3 = T²·ln 3. kldiv_mean: T²·(1/(B·C))·Σ_b Σ_c q(ln q − ln ⅓)
    = T²·(2·ln 3 − 1.5·ln 2)/6 (the 0·ln 0 term is 0, as in nn.KLDivLoss)."""
    z = torch.zeros(2, 3)
    q = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    T = 2.0
    ce, _ = reffakd_terms(z, y, q, alpha=1.0, temperature=T, soft_loss="batchmean_ce")
    kl, _ = reffakd_terms(z, y, q, alpha=1.0, temperature=T, soft_loss="kldiv_mean")
    assert ce.item() == pytest.approx(4 * math.log(3), rel=1e-12)
    assert kl.item() == pytest.approx(4 * (2 * math.log(3) - 1.5 * math.log(2)) / 6, rel=1e-12)
    # α weighs the soft term, 1 − α the hard CE (ln 3 here), whatever the soft loss
    s, h = reffakd_terms(z, y, q, alpha=0.25, temperature=T, soft_loss="kldiv_mean")
    assert s.item() == pytest.approx(0.25 * kl.item(), rel=1e-12) and h.item() == pytest.approx(0.75 * math.log(3))


def test_kldiv_mean_gradient_is_the_batch_mean_gradient_over_c():
    """KL and soft CE differ by the (constant) entropy of q: the student's gradient is exactly C times weaker."""
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 7, dtype=torch.float64), 1)
    y = torch.arange(5)
    g = {}
    for loss in ("batchmean_ce", "kldiv_mean"):
        (grad,) = torch.autograd.grad(reffakd_terms(z, y, q, 1.0, 3.0, soft_loss=loss)[0], z)
        g[loss] = grad
    assert torch.allclose(g["kldiv_mean"] * 7, g["batchmean_ce"], rtol=1e-12, atol=1e-15)


# JEKimLab/ReffAKD @ 475b6e4 (the authors' code), loss_fn_kd of cifar100/tinySLG_distillation.ipynb and of
# fashion_mnist/ and tiny_imagenet/tinySLG_distillation.ipynb (identical there), run on torch.manual_seed(0);
# z = randn(4, 6).double()·3, Q = softmax(randn(6, 6).double(), 1), y = [0, 5, 2, 2], q = Q[y]:
OFFICIAL = {  # (T, α): (cifar100 notebook, fashion_mnist and tiny_imagenet notebooks)
    (1.0, 0.65): (4.929391115529802, 2.0649675683231132),
    (4.0, 0.3): (13.82912044640843, 4.017449682116228),
}


@pytest.mark.parametrize("T,alpha", sorted(OFFICIAL))
def test_soft_losses_equal_the_authors_notebooks(T, alpha):
    torch.manual_seed(0)
    z = torch.randn(4, 6).double() * 3
    Q = torch.softmax(torch.randn(6, 6).double(), dim=1)
    y = torch.tensor([0, 5, 2, 2])
    cifar100, kldiv = OFFICIAL[(T, alpha)]
    assert reffakd_loss(z, y, Q[y], alpha, T, soft_loss="batchmean_ce").item() == pytest.approx(cifar100, rel=1e-12)
    assert reffakd_loss(z, y, Q[y], alpha, T, soft_loss="kldiv_mean").item() == pytest.approx(kldiv, rel=1e-12)


def test_strategy_knob_and_its_error():
    q_logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)) * 2.0  # T·log Q[y] at T = 2
    z = torch.zeros(1, 3)
    batch = Batch(None, torch.tensor([0]), torch.arange(1))
    terms = ReffAKD(alpha=1.0, temperature=2.0, soft_loss="kldiv_mean")(ModelOutput(z), ModelOutput(q_logits), batch, 1)
    assert terms["soft"].item() == pytest.approx(4 * (math.log(3) - 1.5 * math.log(2)) / 3, rel=1e-9)
    with pytest.raises(ConfigError, match="distill.soft_loss='kl'"):
        ReffAKD(soft_loss="kl")


# ------------------------------------------------------------------------------------------------ the table


def test_diagonal_bonus_hand_value():
    """Class 0: two copies of e1 (cosine 1); class 1: e2 and −e2 (cosine −1); across: 0.
    A = diag(1, −1) + bonus·I."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    for bonus in (0.008, 0.0225):
        A = class_similarity(emb, y, 2, diag_bonus=bonus)
        assert torch.allclose(A, torch.tensor([[1.0 + bonus, 0.0], [0.0, -1.0 + bonus]], dtype=torch.float64))


def test_recipes_by_dataset(tmp_path):
    fm = compose_cfg(["data=fashion_mnist", "distill=reffakd"], tmp_path)
    assert (fm.distill.soft_loss, fm.teacher.ae.diag_bonus, fm.teacher.ae.pad) == ("kldiv_mean", 0.008, 0)
    c100 = compose_cfg(["data=cifar100", "distill=reffakd"], tmp_path)
    assert (c100.distill.soft_loss, c100.teacher.ae.diag_bonus, c100.teacher.ae.pad) == ("batchmean_ce", 0.0225, 4)
    plug = compose_cfg(["data=fashion_mnist", "distill=dkd", "teacher=reffakd"], tmp_path)  # the table, any loss
    assert plug.teacher.ae.diag_bonus == 0.008 and "soft_loss" not in plug.distill
    exp = compose_cfg(["experiment=cifar10/quality", "distill=reffakd"], tmp_path)  # no CIFAR-10 notebook: defaults
    assert (exp.distill.soft_loss, exp.teacher.ae.diag_bonus, exp.teacher.ae.epochs) == ("batchmean_ce", 0.0225, 20)
    over = compose_cfg(["data=fashion_mnist", "distill=reffakd", "teacher.ae.diag_bonus=0.0225",
                        "distill.soft_loss=batchmean_ce"], tmp_path)  # the command line still wins
    assert (over.distill.soft_loss, over.teacher.ae.diag_bonus) == ("batchmean_ce", 0.0225)
    assert artifact_name(AESettings(diag_bonus=0.008, pad=0)) != artifact_name(AESettings())  # its own table


def test_autoencoder_augmentation_without_crop_keeps_the_flip():
    x = torch.arange(64 * 3 * 8 * 8, dtype=torch.uint8).view(64, 3, 8, 8)
    idx = torch.arange(64)
    out = augment(x, idx, seed=0, epoch=1, pad=0, rotation=0.0)
    flipped = [bool(torch.equal(out[i], x[i].flip(-1).float())) for i in range(64)]
    kept = [bool(torch.equal(out[i], x[i].float())) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_zero_output_mse_is_the_mean_square_of_the_normalised_images():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    expected = float((normalise(x.float(), mean, std) ** 2).mean())
    assert ae_test_mse(None, x, mean, std, batch=3, device=torch.device("cpu")) == pytest.approx(expected, rel=1e-6)
    pixels = float(((x.float() / 255) ** 2).mean())  # teacher.ae.recon_target=pixels: the target is x/255
    assert ae_test_mse(None, x, mean, std, 4, torch.device("cpu"), "pixels") == pytest.approx(pixels, rel=1e-6)
    with pytest.raises(ConfigError, match="teacher.ae.recon_target='raw'"):
        AESettings(recon_target="raw")
    assert artifact_name(AESettings(recon_target="pixels")) != artifact_name(AESettings())


def test_table_stats_and_smoothing_equivalents_hand_values():
    C = 10
    uniform = table_stats(torch.full((C, C), 1.0 / C, dtype=torch.float64))
    assert uniform["entropy_rel_mean"] == pytest.approx(1.0)
    assert uniform["label_smoothing_equivalent"] == pytest.approx(1.0)
    Q = torch.full((C, C), 0.1 / (C - 1), dtype=torch.float64)
    Q.fill_diagonal_(0.9)
    st = table_stats(Q)  # label smoothing ε puts 1 − ε + ε/C on the true class: 0.9 ⇒ ε = 0.1·C/(C−1)
    assert st["true_class_prob_mean"] == pytest.approx(0.9) and st["label_smoothing_equivalent"] == pytest.approx(1 / 9)
    assert st["entropy_mean"] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1 / 9)))
    assert equivalent_smoothing(1.0, C) == 0.0


@pytest.mark.parametrize("soft_loss,w", [("batchmean_ce", 1.0), ("kldiv_mean", 1.0 / 6)])
def test_loss_optimum_at_t1_is_the_mixture_of_table_and_label(soft_loss, w):
    """At T = 1 the loss is (α·w + 1 − α)·CE(target, p) with the target
    (α·w·Q[y] + (1 − α)·e_y)/(α·w + 1 − α)."""
    torch.manual_seed(1)
    Q = torch.softmax(torch.randn(6, 6, dtype=torch.float64), 1)
    alpha = 0.7
    target = (alpha * w * Q + (1 - alpha) * torch.eye(6, dtype=torch.float64)) / (alpha * w + 1 - alpha)
    got = smoothing_at_optimum(Q, alpha, 1.0, soft_loss)
    p_true = float(torch.diagonal(target).mean())
    assert got["true_class_prob_mean"] == pytest.approx(p_true, abs=1e-6)
    assert got["label_smoothing_equivalent"] == pytest.approx(equivalent_smoothing(p_true, 6), abs=1e-5)
    hot = smoothing_at_optimum(Q, alpha, 5.0, soft_loss)  # a higher T softens less at the optimum: p is sharper
    assert hot["true_class_prob_mean"] > got["true_class_prob_mean"]
    assert smoothing_at_optimum(Q, 0.0, 5.0, soft_loss)["label_smoothing_equivalent"] == 0.0


def test_stage_a_records_the_plateau_and_the_table_flatness(tmp_path, capsys, one_thread):
    from kdx.run import run

    ae = ["teacher.ae.epochs=1", "teacher.ae.milestones=[1]", "teacher.ae.samples_per_class=2"]
    res = run(compose_cfg(TINY + ["distill=reffakd", "distill.soft_loss=kldiv_mean", "distill.alpha=0.4"] + ae,
                          tmp_path))
    assert res["status"] == "complete"
    stage_a = json.loads((tmp_path / "run" / "reffakd_ae" / "results.json").read_text())
    assert stage_a["zero_output_test_mse"] > 0 and stage_a["best_test_mse"] > 0
    assert set(stage_a["table_stats"]) >= {"entropy_rel_mean", "true_class_prob_mean", "label_smoothing_equivalent"}
    info = json.loads((tmp_path / "run" / "results.json").read_text())["teacher_info"]
    assert info["ae_zero_output_test_mse"] == stage_a["zero_output_test_mse"]
    assert info["table_stats"] == pytest.approx(stage_a["table_stats"])
    assert main([str(tmp_path / "run" / "results.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loss"] == {"alpha": 0.4, "temperature": 5.0, "soft_loss": "kldiv_mean"}  # the run's own settings
    assert 0.0 <= out["optimum"]["label_smoothing_equivalent"] <= 1.0
    assert out["table"] == pytest.approx(info["table_stats"])
