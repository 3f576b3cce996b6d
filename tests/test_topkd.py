"""TopKD (docs/methods.md#topkd, our reading): TSM, L_con, L_TDL against hand values and invariants; end to end."""
import math

import pytest
import torch

from conftest import compose_cfg
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.dkd import DKD
from kdx.distill.kd import KD
from kdx.distill.topkd import (
    TopKD,
    TopKScale,
    contrastive_loss,
    tdl_groups,
    top_k_decoupled_loss,
    top_k_scale,
    topkd_loss,
)
from kdx.run import build_job as build, run


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


Z = [3.0, 1.0, 2.0, -1.0, 0.0]  # K=2: top-K = {0 (rank 1), 2 (rank 2)}; mean top 2.5, mean rest 0 → Δ = 0.25


def test_tsm_hand_values_teacher_right():
    # w_1 = 1 + 0.5·2/2 = 1.5, w_2 = 1 + 0.5·1/2 = 1.25
    out = top_k_scale(t([Z]), torch.tensor([0]), k=2, gamma=0.5, lam=0.1)
    assert out[0].tolist() == pytest.approx([3 * 1.5 + 0.25, 1.0, 2 * 1.25 + 0.25, -1.0, 0.0], abs=1e-12)


def test_tsm_bias_correction_on_a_non_top_k_ground_truth():
    y = torch.tensor([1])  # the teacher is wrong and the GT logit is outside the top K
    on = top_k_scale(t([Z]), y, k=2, gamma=0.5, lam=0.1, gt_correction=True)
    off = top_k_scale(t([Z]), y, k=2, gamma=0.5, lam=0.1, gt_correction=False)
    assert on[0].tolist() == pytest.approx([4.75, 1.0 * 1.5 + 0.25, 2.75, -1.0, 0.0], abs=1e-12)
    assert off[0].tolist() == pytest.approx([4.75, 1.0, 2.75, -1.0, 0.0], abs=1e-12)  # GT left unchanged
    explicit = top_k_scale(t([Z]), y, k=2, gamma=0.5, lam=0.1, gt_weight=3.0)
    assert explicit[0, 1].item() == pytest.approx(3.0 + 0.25)


def test_tsm_bias_correction_on_a_top_k_ground_truth():
    y = torch.tensor([2])  # wrong teacher, GT at rank 2: the rank-1 weight 1+γ instead of 1.25
    on = top_k_scale(t([Z]), y, k=2, gamma=0.5, lam=0.1)
    off = top_k_scale(t([Z]), y, k=2, gamma=0.5, lam=0.1, gt_correction=False)
    assert on[0, 2].item() == pytest.approx(2 * 1.5 + 0.25) and off[0, 2].item() == pytest.approx(2.75)
    assert on[0, [1, 3, 4]].tolist() == Z[1:2] + Z[3:]  # the non-top-K logits are untouched


def test_tsm_leaves_non_top_k_unchanged_on_random_batches():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 20, (16,), generator=g)
    for corr in (True, False):
        out = top_k_scale(z, y, k=4, gamma=0.7, lam=0.3, gt_correction=corr)
        top = torch.zeros_like(z, dtype=torch.bool).scatter(1, z.topk(4, dim=1).indices, True)
        gt = torch.nn.functional.one_hot(y, 20).bool() & (z.argmax(1) != y).unsqueeze(1)
        keep = ~top & ~gt if corr else ~top
        assert torch.equal(out[keep], z[keep])
        assert not torch.equal(out[top], z[top])
        if not corr:
            assert torch.equal(out[~top], z[~top])


def test_tsm_k_equals_c_and_no_scaling_is_identity():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    assert torch.equal(top_k_scale(z, y, k=10, gamma=0.0, lam=0.0), z)
    assert torch.equal(TopKScale(k=10, gamma=0.0, lam=0.0)(z, y), z)
    # K = C with scaling: Δ = 0 (no non-top-K set), only the rank weights apply
    out = top_k_scale(z, y, k=10, gamma=0.5, lam=0.1, gt_correction=False)
    ranks = z.argsort(dim=1, descending=True).argsort(dim=1) + 1
    assert torch.allclose(out, z * (1 + 0.5 * (10 - ranks + 1) / 10))


def test_tsm_bad_k_names_the_setting():
    with pytest.raises(ValueError, match="distill.teacher_transform.k"):
        TopKScale(k=11)(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="distill.k"):
        topkd_loss(torch.zeros(2, 10), torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), k=0)
    with pytest.raises(ValueError, match="distill.con_teacher"):
        TopKD(con_teacher="teacher")


def test_contrastive_hand_values():
    ls = lambda a: math.log(1 + math.exp(-a))  # noqa: E731  CE of [a, 0] at index 0
    z_s = t([[1.0, 0.0], [0.0, 1.0]])
    assert contrastive_loss(z_s, z_s, tau=1.0).item() == pytest.approx(ls(1.0), rel=1e-12)
    assert contrastive_loss(z_s, z_s, tau=0.5).item() == pytest.approx(ls(2.0), rel=1e-12)
    # unnormalised, non-symmetric S = [[1, 2], [0, 1]]: both directions enter, with the diagonal positive
    z_t = t([[1.0, 0.0], [2.0, 1.0]])
    rows = [-math.log(math.e / (math.e + math.e**2)), -math.log(math.e / (1 + math.e))]
    cols = [-math.log(math.e / (math.e + 1)), -math.log(math.e / (math.e**2 + math.e))]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    assert contrastive_loss(z_s, z_t, tau=1.0, normalize=False).item() == pytest.approx(expected, rel=1e-12)
    # normalised rows: invariant to a positive scale of any row
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    scale = torch.rand(6, 1, generator=g, dtype=torch.float64) + 0.5
    assert contrastive_loss(a * scale, b, 0.1).item() == pytest.approx(contrastive_loss(a, b, 0.1).item(), rel=1e-12)


def test_tdl_groups_and_hand_value():
    pos, neg, non = tdl_groups(t([Z]), k=1)
    assert pos[0].tolist() == [True, False, False, False, False]
    assert neg[0].tolist() == [False, False, False, True, False]
    assert non[0].tolist() == [False, True, True, False, True]
    # student [-2, 0, 1, -1, 2]: pos cos(−2, 3) = −1; neg cos(−1, −1) = 1; non cos([0,1,2],[1,2,0]) = 2/5
    s = t([[-2.0, 0.0, 1.0, -1.0, 2.0]])
    got = top_k_decoupled_loss(s, t([Z]), k=1, alpha=2.0, beta=3.0, w_non=1.0)
    assert got.item() == pytest.approx(2.0 * 2 + 3.0 * 0 + (1 - 0.4), rel=1e-12)
    # 2K > C: the negative group takes what is left, the non-top-K group is empty (its term is 0)
    pos, neg, non = tdl_groups(t([[3.0, 1.0, 2.0]]), k=2)
    assert pos.sum() == 2 and neg.sum() == 1 and non.sum() == 0
    # sign split: a non-positive top-K logit and a non-negative bottom-K logit move to non-top-K
    pos, neg, non = tdl_groups(t([[3.0, 1.0, 2.0, 0.5, -1.0, 0.2]]), k=2, sign_split=True)
    pos2, neg2, _ = tdl_groups(t([[-3.0, -1.0, -2.0, -0.5, -1.5, -0.2]]), k=2, sign_split=True)
    assert neg[0].tolist() == [False, False, False, False, True, False] and pos2.sum() == 0 and neg2.sum() == 2


def test_tdl_is_zero_for_positively_scaled_student_logits():
    g = torch.Generator().manual_seed(3)
    z_t = torch.randn(8, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 12, (8,), generator=g)
    for c in (0.3, 1.0, 7.0):
        assert top_k_decoupled_loss(c * z_t, z_t, k=3).item() == pytest.approx(0.0, abs=1e-12)
        assert top_k_decoupled_loss(c * z_t, z_t, k=3, sign_split=True).item() == pytest.approx(0.0, abs=1e-12)
        # inside TopKD the TDL compares with the scaled teacher logits (tdl_teacher=scaled), or the raw ones
        scaled = top_k_scale(z_t, y, k=3)
        assert topkd_loss(c * scaled, z_t, y, k=3)["tdl"].item() == pytest.approx(0.0, abs=1e-12)
        assert topkd_loss(c * z_t, z_t, y, k=3, tdl_teacher="raw")["tdl"].item() == pytest.approx(0.0, abs=1e-12)
    assert top_k_decoupled_loss(-z_t, z_t, k=3).item() == pytest.approx(6.0, abs=1e-12)  # every cos = −1: 2·(1+1+1)


def test_topkd_terms_are_the_weighted_parts():
    g = torch.Generator().manual_seed(4)
    z_s, z_t = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    terms = topkd_loss(z_s, z_t, y, k=3, tau=0.2, w_ce=0.5, lambda_con=2.0, lambda_tdl=3.0, con_teacher="raw")
    scaled = top_k_scale(z_t, y, k=3)
    assert set(terms) == {"ce", "con", "tdl"}
    assert terms["ce"].item() == pytest.approx(0.5 * torch.nn.functional.cross_entropy(z_s, y).item(), rel=1e-12)
    assert terms["con"].item() == pytest.approx(2.0 * contrastive_loss(z_s, z_t, 0.2).item(), rel=1e-12)
    assert terms["tdl"].item() == pytest.approx(3.0 * top_k_decoupled_loss(z_s, scaled, 3).item(), rel=1e-12)
    strat = TopKD(k=3, tau=0.2, w_ce=0.5, lambda_con=2.0, lambda_tdl=3.0, con_teacher="raw")
    got = strat(ModelOutput(z_s), ModelOutput(z_t), Batch(None, y, torch.arange(6)), 1)
    assert all(got[k].item() == pytest.approx(terms[k].item(), rel=1e-12) for k in terms)


@pytest.mark.parametrize("knobs", [{}, {"tdl_sign_split": True, "con_normalize": False, "tdl_teacher": "raw"}])
def test_topkd_gradcheck_float64(knobs):
    g = torch.Generator().manual_seed(5)
    z_s = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 8, (5,), generator=g)

    def f(a, b):
        return torch.stack(list(topkd_loss(a, b, y, k=3, **knobs).values())).sum()

    assert torch.autograd.gradcheck(f, (z_s, z_t), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda b: top_k_scale(b, y, 3), (z_t,), eps=1e-6, atol=1e-7)


def test_topkd_promotes_half_precision_logits():
    z = torch.randn(4, 10).to(torch.bfloat16)
    terms = topkd_loss(z, z, torch.zeros(4, dtype=torch.long), k=3)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize(
    "overrides, strategy_cls, terms",
    [
        (["distill=topkd"], TopKD, {"ce", "con", "tdl"}),
        (["distill=kd", "distill/teacher_transform=topk_scale", "distill.teacher_transform.k=3"], KD, {"ce", "kd"}),
        (["distill=kd_crd", "distill/teacher_transform=topk_scale"], KD, {"ce", "kd"}),
        (["distill=dkd", "distill/teacher_transform=topk_scale"], DKD, {"ce", "tckd", "nckd"}),
    ],
    ids=["topkd", "kd+tsm", "kd_crd+tsm", "dkd+tsm"],
)
def test_end_to_end_through_the_real_config(tmp_path, tiny, teacher_ckpt, overrides, strategy_cls, terms):
    cfg = compose_cfg(tiny + overrides + [f"teacher.ckpt={teacher_ckpt}", "logger=csv"], tmp_path)
    job = build(cfg)
    strat = job.module.strategy
    assert isinstance(strat, strategy_cls)
    if strategy_cls is not TopKD:
        assert isinstance(strat.teacher_transform, TopKScale)
        assert strat.teacher_transform.k == (3 if "distill.teacher_transform.k=3" in overrides else 5)
        # the module hands the strategy the TSM-scaled teacher logits
        z = torch.randn(4, 10)
        y = torch.tensor([0, 1, 2, 3])
        assert torch.equal(strat.transform_teacher(z, y), top_k_scale(z, y, strat.teacher_transform.k))
    else:
        assert strat.teacher_transform is None and strat.knobs["k"] == 5
    res = run(compose_cfg(tiny + overrides + [f"teacher.ckpt={teacher_ckpt}", "logger=csv"], tmp_path, name="r"))
    assert res["status"] == "complete" and res["test_acc1_last"] is not None
    header = (tmp_path / "r" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {h[len("train/loss/"):] for h in header if h.startswith("train/loss/")} == terms


def test_topkd_recipes_compose_for_every_dkd_pair(tmp_path):
    """TopKD on every pair of the DKD table: the pair's protocol (experiment=cifar100/dkd/<pair>) with distill=topkd."""
    from pathlib import Path

    from kdx.config import validate

    root = Path(__file__).resolve().parent.parent / "conf" / "experiment" / "cifar100"
    pairs = sorted(p.stem for p in (root / "dkd").glob("*.yaml"))
    assert len(pairs) == 11
    for pair in pairs:
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", "distill=topkd"], tmp_path)
        validate(cfg)
        assert cfg.distill._target_ == "kdx.distill.topkd.TopKD" and cfg.method == "topkd" and cfg.distill.k == 5
        dkd = compose_cfg([f"experiment=cifar100/dkd/{pair}"], tmp_path)
        for key in ("model", "teacher", "optim", "scheduler", "data"):
            assert cfg[key] == dkd[key], (pair, key)
        assert cfg.trainer.max_epochs == 240
