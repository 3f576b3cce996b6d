"""ReffAKD (docs/methods.md#reffakd): similarity matrix, soft labels, table teacher, loss, autoencoder, stage A → B."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, compose_cfg
from kdx.config import validate
from kdx.errors import ConfigError
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.losses import reffakd_loss, reffakd_terms
from kdx.distill.reffakd import ReffAKD
from kdx.errors import CheckpointError
from kdx.io import atomic_torch_save, atomic_write_json, sha256_file
from kdx.run import run
from kdx.teachers.reffakd import ReffAKDTeacher
from kdx.teachers.reffakd_stage_a import (
    ReffAE,
    num_params,
    rotate,
    rotation_degrees,
    save_heatmap,
    select_per_class,
)
from kdx.teachers.reffakd_table import AESettings, artifact_name, class_similarity, soft_labels

# the tiny synthetic job (its teacher_arch is the network teacher's, which a table teacher does not have)
BASE = list(TINY)
AE = ["teacher.ae.epochs=2", "teacher.ae.milestones=[1]", "teacher.ae.samples_per_class=4"]


def reference_similarity(emb, labels, num_classes, bonus):
    """The official accumulation, literally: every unordered pair i < j, one at a time."""
    total = [[0.0] * num_classes for _ in range(num_classes)]
    count = [[0] * num_classes for _ in range(num_classes)]
    n = len(labels)
    for i in range(n):
        for j in range(i + 1, n):
            s = F.cosine_similarity(emb[i : i + 1], emb[j : j + 1], eps=1e-8).item()
            a, b = int(labels[i]), int(labels[j])
            if a != b:
                total[a][b] += s
                total[b][a] += s
                count[a][b] += 1
                count[b][a] += 1
            else:
                total[a][a] += s
                count[a][a] += 1
    return torch.tensor([[total[a][b] / count[a][b] + (bonus if a == b else 0.0) for b in range(num_classes)]
                         for a in range(num_classes)], dtype=torch.float64)


def test_class_similarity_hand_example():
    r2 = math.sqrt(0.5)
    # class 0: [1,0], [0,1], [1,1]; class 1: [1,1], [1,0] (interleaved, so pairs i<j run in both class orders)
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 0])
    A = class_similarity(emb, y, 2, diag_bonus=0.0)
    # same class, each unordered pair once, no self pairs: class 0 pairs (0,2)=0, (0,4)=r2, (2,4)=r2
    assert A[0, 0].item() == pytest.approx(2 * r2 / 3, rel=1e-12)
    assert A[1, 1].item() == pytest.approx(r2, rel=1e-12)  # one pair: cos([1,1], [1,0])
    # cross: the 6 pairs (0-class, 1-class): [1,0]·{[1,1],[1,0]} = r2, 1; [0,1]·.. = r2, 0; [2,2]·.. = 1, r2
    cross = (r2 + 1 + r2 + 0 + 1 + r2) / 6
    assert A[0, 1].item() == pytest.approx(cross, rel=1e-12) and A[1, 0].item() == pytest.approx(cross, rel=1e-12)
    bonus = class_similarity(emb, y, 2)  # default diag_bonus 0.0225 on the diagonal only
    assert torch.allclose(bonus - A, 0.0225 * torch.eye(2, dtype=torch.float64), atol=1e-15)


def test_class_similarity_matches_the_pairwise_loop_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(24, 7, generator=g)
    y = torch.randint(0, 4, (24,), generator=g)
    y[:8] = torch.arange(4).repeat(2)  # every class at least twice
    A = class_similarity(emb, y, 4)
    assert torch.allclose(A, reference_similarity(emb, y, 4, 0.0225), atol=1e-6)
    assert torch.equal(A, A.T)
    # cosine: invariant to a positive scale of any embedding
    scale = torch.rand(24, 1, generator=g) + 0.1
    assert torch.allclose(class_similarity(emb * scale, y, 4), A, atol=1e-6)


def test_class_similarity_errors_name_the_setting():
    with pytest.raises(ValueError, match="teacher.ae.samples_per_class"):
        class_similarity(torch.randn(3, 4), torch.tensor([0, 0, 1]), 2)


def test_soft_label_rows_sum_to_one():
    A = class_similarity(torch.randn(40, 16), torch.arange(10).repeat(4), 10)
    Q = soft_labels(A)
    assert torch.allclose(Q.sum(1), torch.ones(10, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q, torch.softmax(A, dim=1)) and bool((Q > 0).all())
    assert torch.equal(Q.argmax(1), A.argmax(1))


def write_artifact(d: Path, Q: torch.Tensor, dataset: str = "synthetic") -> Path:
    A = torch.log(Q)
    atomic_torch_save({"A": A, "Q": Q}, d / "table.pt")
    atomic_torch_save(ReffAE().state_dict(), d / "ae.pt")
    atomic_write_json(d / "reffakd.json", {"dataset": dataset, "table_sha256": sha256_file(d / "table.pt"),
                                           "ae_params": 47355, "ae_train_time_s": 1.5, "soft_label_build_time_s": 0.5,
                                           "settings": {"epochs": 3}})
    return d


@pytest.mark.parametrize("T", [1.0, 4.0, 5.0, 20.0])
def test_pseudo_teacher_logits_reproduce_q_of_the_label(tmp_path, T):
    Q = soft_labels(torch.randn(6, 6, dtype=torch.float64))
    teacher = ReffAKDTeacher(artifact=str(write_artifact(tmp_path, Q)), temperature=T, num_classes=6)
    y = torch.tensor([0, 3, 5, 3])
    out = teacher(torch.zeros(4, 3, 8, 8), y, torch.arange(4))
    assert out.logits.shape == (4, 6) and out.taps == {}
    assert torch.allclose(out.logits / T, torch.log(Q[y]).float(), atol=1e-6)
    assert torch.allclose(torch.softmax(out.logits / T, dim=1).double(), Q[y], atol=1e-6)
    assert not teacher.measures_accuracy and list(teacher.parameters()) == []
    teacher.train()
    assert not teacher.training
    assert teacher.resources["ae_params"] == 47355 and teacher.resources["soft_label_build_time_s"] == 0.5


def test_table_teacher_checks_classes_and_integrity(tmp_path):
    d = write_artifact(tmp_path, soft_labels(torch.randn(5, 5, dtype=torch.float64)))
    with pytest.raises(CheckpointError, match="teacher.artifact"):
        ReffAKDTeacher(artifact=str(d), num_classes=10)
    (d / "table.pt").write_bytes((d / "table.pt").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256"):
        ReffAKDTeacher(artifact=str(d))
    with pytest.raises(CheckpointError, match="teacher.artifact"):
        ReffAKDTeacher(artifact=str(tmp_path / "nowhere"))


def test_reffakd_loss_hand_value_and_float64():
    z = torch.zeros(1, 2)
    q = torch.tensor([[0.75, 0.25]])
    y = torch.tensor([0])
    # soft: −(0.75·log ½ + 0.25·log ½)·T² = 4·log 2 at T = 2; CE = log 2
    got = reffakd_loss(z, y, q, alpha=0.3, temperature=2.0)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(0.3 * 4 * math.log(2) + 0.7 * math.log(2), rel=1e-12)
    z2 = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    q2 = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    y2 = torch.tensor([1, 0])
    T = 3.0
    soft = -sum(q2[b, c].item() * math.log(torch.softmax(z2[b] / T, 0)[c].item()) for b in range(2) for c in range(2)) / 2
    ce = F.cross_entropy(z2.double(), y2).item()
    s, h = reffakd_terms(z2, y2, q2, alpha=0.8, temperature=T)
    assert s.item() == pytest.approx(0.8 * T**2 * soft, rel=1e-6) and h.item() == pytest.approx(0.2 * ce, rel=1e-12)
    assert reffakd_loss(z2, y2, q2, 0.8, T, float64=False).dtype == torch.float32
    zg = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    qg = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda a: reffakd_loss(a, torch.tensor([0, 1, 2, 3]), qg, 0.4, 5.0), (zg,))


def test_reffakd_strategy_on_the_table_teacher_is_the_paper_loss(tmp_path):
    Q = soft_labels(torch.randn(5, 5, dtype=torch.float64))
    teacher = ReffAKDTeacher(artifact=str(write_artifact(tmp_path, Q)), temperature=5.0)
    y = torch.tensor([4, 0, 2])
    z_s = torch.randn(3, 5)
    strat = ReffAKD(alpha=0.6, temperature=5.0)
    terms = strat(ModelOutput(z_s), teacher(None, y, None), Batch(None, y, torch.arange(3)), 1)
    assert set(terms) == {"soft", "ce"}
    expected = reffakd_loss(z_s, y, Q[y], 0.6, 5.0)
    assert (terms["soft"] + terms["ce"]).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="distill.alpha"):
        ReffAKD(alpha=1.5)


def test_autoencoder_is_the_official_one():
    ae = ReffAE()
    assert num_params(ae) == 47355
    x = torch.rand(2, 3, 32, 32)
    assert ae.encode(x).shape == (2, 768)
    out = ae(x)
    assert out.shape == x.shape and bool((out >= 0).all() and (out <= 1).all())  # sigmoid decoder


def test_rotation_and_selection():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(rotate(x, torch.zeros(2)), x)
    r90 = rotate(x, torch.full((2,), 90.0))
    assert torch.equal(r90, torch.rot90(x, 1, (2, 3))) or torch.equal(r90, torch.rot90(x, -1, (2, 3)))
    deg = rotation_degrees(0, 3, torch.arange(1000), 15.0)
    assert float(deg.abs().max()) <= 15.0 and float(deg.std()) > 5.0
    assert torch.equal(deg, rotation_degrees(0, 3, torch.arange(1000), 15.0))
    y = torch.arange(5).repeat(10)
    picked = select_per_class(y, 5, 4, seed=42)
    assert len(picked) == 20 and torch.equal(torch.bincount(y[picked]), torch.full((5,), 4))
    assert torch.equal(picked, select_per_class(y, 5, 4, seed=42))
    assert not torch.equal(picked, select_per_class(y, 5, 4, seed=1))
    with pytest.raises(ValueError, match="teacher.ae.samples_per_class"):
        select_per_class(y, 5, 11, seed=42)


def test_heatmap_png(tmp_path):
    A = class_similarity(torch.randn(30, 8), torch.arange(3).repeat(10), 3)
    p = save_heatmap(A, ["cat", "dog", "ship"], tmp_path / "a.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_artifact_key_follows_the_settings(tmp_path):
    base = AESettings()
    assert base.epochs == 200 and base.milestones == [60, 120, 160] and base.samples_per_class == 40
    assert artifact_name(AESettings(eval_batch_size=7)) == artifact_name(base)  # not part of the key
    assert artifact_name(AESettings(epochs=3)) != artifact_name(base)
    with pytest.raises(ConfigError, match="teacher.ae.epochs"):
        AESettings(epochs=0)
    with pytest.raises(ConfigError, match="Did you mean 'teacher.ae.epochs'"):  # a misspelt key stops at start-up
        validate(compose_cfg(BASE + ["distill=reffakd", "+teacher.ae.epoch=3"], tmp_path))


def test_teacher_temperature_follows_the_loss(tmp_path):
    assert compose_cfg(BASE + ["distill=reffakd"], tmp_path).teacher.temperature == 5.0
    cfg = compose_cfg(BASE + ["distill=dkd", "teacher=reffakd"], tmp_path)
    assert cfg.teacher._target_.endswith("ReffAKDSource") and cfg.teacher.temperature == 4.0
    net = compose_cfg(BASE + ["distill=reffakd", "teacher=net"], tmp_path)
    assert net.teacher._target_.endswith("NetworkTeacherSource")
    from kdx.config import validate

    recipe = compose_cfg(["experiment=cifar100/reffakd/resnet18"], tmp_path)
    validate(recipe)
    assert recipe.teacher._target_.endswith("ReffAKDSource") and recipe.distill._target_.endswith("ReffAKD")
    assert (recipe.model.name, recipe.optim.lr, recipe.data.batch_size, recipe.trainer.max_epochs) == ("ResNet18", 0.1, 128, 200)
    assert list(recipe.scheduler.milestones) == [60, 120, 160] and recipe.scheduler.gamma == 0.2


# --------------------------------------------------------------------------- stage A → stage B, end to end


def test_stage_a_then_stage_b(tmp_path, caplog):
    a = run(compose_cfg(BASE + ["task=reffakd_ae", "teacher=reffakd", "logger=wandb"] + AE, tmp_path, "stage_a"))
    d = Path(a["artifact"])
    assert d.parent == tmp_path / "teachers" / "synthetic" and d.name == artifact_name(AESettings(
        epochs=2, milestones=[1], samples_per_class=4))
    for f in ("ae.pt", "table.pt", "reffakd.json", "similarity.png"):
        assert (d / f).is_file(), f
    assert (tmp_path / "stage_a" / "similarity.png").is_file()
    saved = json.loads((tmp_path / "stage_a" / "results.json").read_text())
    assert saved["task"] == "reffakd_ae" and saved["ae_params"] == 47355 and len(saved["history"]) == 2
    assert saved["num_selected"] == 40 and saved["embedding_dim"] == 768
    meta = json.loads((d / "reffakd.json").read_text())
    table = torch.load(d / "table.pt", weights_only=True)
    assert table["A"].shape == (10, 10) and torch.allclose(table["Q"], soft_labels(table["A"]))
    assert meta["class_names"][:2] == ["class_0", "class_1"]
    ae = ReffAE()
    ae.load_state_dict(torch.load(d / "ae.pt", weights_only=True))  # the best-test-MSE weights
    assert meta["best_epoch"] in (1, 2) and meta["best_test_mse"] == min(r["test_mse"] for r in saved["history"])

    caplog.clear()
    res = run(compose_cfg(BASE + ["distill=reffakd"] + AE, tmp_path, "stage_b"))
    assert "running stage A" not in caplog.text  # found in the store
    assert res["method"] == "reffakd" and res["teacher"] == "reffakd" and res["teacher_acc1"] is None
    saved = json.loads((tmp_path / "stage_b" / "results.json").read_text())
    r = saved["resources"]
    assert r["ae_params"] == 47355 and r["teacher_params"] == 0 and r["stage_a_ran_in_this_run"] is False
    assert r["ae_train_time_s"] == meta["ae_train_time_s"] and r["soft_label_build_time_s"] == meta["soft_label_build_time_s"]
    assert r["student_params"] > 0 and saved["teacher_info"]["artifact"] == str(d)


def test_missing_table_runs_stage_a_first_under_dkd(tmp_path, caplog):
    res = run(compose_cfg(BASE + ["distill=dkd", "teacher=reffakd", "logger=csv"] + AE, tmp_path))
    assert "running stage A first" in caplog.text
    assert res["method"] == "dkd@reffakd" and res["status"] == "complete"
    assert res["resources"]["stage_a_ran_in_this_run"] is True
    assert (tmp_path / "run" / "reffakd_ae" / "similarity.png").is_file()
    assert (tmp_path / "run" / "reffakd_ae" / "results.json").is_file()
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss/tckd", "train/loss/nckd"} <= set(header) and "teacher/acc1" not in header


def test_stage_a_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="teacher=reffakd"):
        run(compose_cfg(BASE + ["task=reffakd_ae"], tmp_path))
    with pytest.raises(CheckpointError, match="teacher.auto_build"):
        run(compose_cfg(BASE + ["distill=reffakd", "teacher.auto_build=false"] + AE, tmp_path))


@pytest.mark.parametrize("overrides", [["distill=reffakd"], ["distill=dkd", "teacher=reffakd"]])
def test_table_teacher_composes_with_an_experiment_made_for_a_network_teacher(tmp_path, overrides):
    """experiment=cifar10/quality names a network teacher (teacher_arch) and its recipe (conf/recipe/teacher/):
    with the table teacher neither reaches the teacher node (it has no such settings), and the experiment's
    stage-A budget (conf/recipe/reffakd_ae/) does."""
    cfg = compose_cfg(["experiment=cifar10/quality"] + overrides, tmp_path)
    validate(cfg)
    assert "model" not in cfg.teacher and "train" not in cfg.teacher
    assert cfg.teacher.ae.epochs == 20 and list(cfg.teacher.ae.milestones) == [10, 15]
    net = compose_cfg(["experiment=cifar10/quality", "distill=kd"], tmp_path)
    assert net.teacher.model.name == "resnet20" and net.teacher.train.max_epochs == 12
