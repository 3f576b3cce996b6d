"""The real config tree: every default composes and validates; misspelt keys fail early and clearly."""
from __future__ import annotations

import json

import pytest
from hydra.errors import ConfigCompositionException

from conftest import ROOT, compose_cfg
from kdx.config import resolved, validate
from kdx.errors import ConfigError

CONF = ROOT / "conf"
GROUP = lambda g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))  # noqa: E731
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))


def check(cfg):
    validate(cfg)
    return resolved(cfg)


@pytest.mark.parametrize("data", GROUP("data"))
@pytest.mark.parametrize("distill", GROUP("distill"))
def test_every_data_x_distill_composes(tmp_path, data, distill):
    cfg = check(compose_cfg([f"data={data}", f"distill={distill}"], tmp_path))
    assert cfg.method == distill and cfg.data._target_.startswith("kdx.data.")


@pytest.mark.parametrize("model", [m for m in GROUP("model") if m != "user"])  # user: tests/test_first_hour.py
def test_every_model_composes_as_student_and_teacher(tmp_path, model):
    cfg = check(compose_cfg([f"model={model}", f"teacher_arch={model}"], tmp_path))
    assert cfg.model.name == cfg.teacher.model.name
    assert cfg.model._target_ in ("kdx.models.create_model", "kdx.models.user_model")  # tv_resnet*: torchvision


@pytest.mark.parametrize("group", ["optim", "scheduler", "trainer", "logger"])
def test_every_option_of_other_groups_composes(tmp_path, group):
    for option in GROUP(group):
        check(compose_cfg([f"{group}={option}"], tmp_path))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, experiment):
    cfg = check(compose_cfg([f"experiment={experiment}"], tmp_path))
    assert cfg.trainer.max_epochs > 0


def test_dkd_pair_recipe_sets_beta_and_lr(tmp_path):
    cfg = check(compose_cfg(["experiment=cifar100/dkd/res32x4_shuv1"], tmp_path))
    assert (cfg.model.name, cfg.teacher.model.name) == ("ShuffleV1", "resnet32x4")
    assert cfg.distill.beta == 8.0 and cfg.optim.lr == 0.01 and cfg.teacher.train.optim.lr == 0.05
    cfg = check(compose_cfg(["experiment=cifar100/dkd/res56_res20"], tmp_path))
    assert cfg.distill.beta == 2.0 and cfg.optim.lr == 0.05
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.trainer.max_epochs == 240
    # the pair recipe also serves other methods: distill=kd replaces the experiment's dkd
    cfg = check(compose_cfg(["experiment=cifar100/dkd/res32x4_res8x4", "distill=kd_crd"], tmp_path))
    assert cfg.distill._target_ == "kdx.distill.kd.KD" and cfg.distill.w_ce == 1.0 and cfg.method == "kd_crd"
    # and the command line still beats the recipe
    cfg = check(compose_cfg(["experiment=cifar100/dkd/res32x4_res8x4", "distill.beta=3"], tmp_path))
    assert cfg.distill.beta == 3


def test_defaults_are_the_paper_recipe(tmp_path):
    cfg = check(compose_cfg([], tmp_path))
    assert cfg.data.name == "cifar100" and cfg.data.batch_size == 64
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.05, 0.9, 5e-4)
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.trainer.max_epochs == 240
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.mode == "offline"


def test_misspelt_key_on_command_line_fails_at_compose(tmp_path):
    with pytest.raises(ConfigCompositionException, match="temprature"):
        compose_cfg(["distill.temprature=2"], tmp_path)


def test_added_unknown_key_fails_validation_with_suggestion(tmp_path):
    cfg = compose_cfg(["+distill.temprature=2"], tmp_path)
    with pytest.raises(ConfigError, match=r"distill.temprature.*Did you mean 'distill.temperature'"):
        validate(cfg)


def test_unknown_optimizer_key_fails(tmp_path):
    cfg = compose_cfg(["+optim.momentun=0.8"], tmp_path)
    with pytest.raises(ConfigError, match="optim.momentun"):
        validate(cfg)


@pytest.mark.parametrize("data", ["synthetic", "cifar100", "fashion_mnist"])
def test_datamodule_keys_are_checked_through_the_base_class(tmp_path, data):
    """Datamodules pass **common on to ArrayDataModule: its arguments are valid keys, typos are not."""
    validate(compose_cfg([f"data={data}", "data.batch_size=32", "data.subset=0.5"], tmp_path))
    with pytest.raises(ConfigError, match=r"data.batchsize.*Did you mean 'data.batch_size'"):
        validate(compose_cfg([f"data={data}", "+data.batchsize=32"], tmp_path))


def test_unknown_top_level_key_and_task_fail(tmp_path):
    with pytest.raises(ConfigError, match="Unknown top-level"):
        validate(compose_cfg(["+epochs=3"], tmp_path))
    with pytest.raises(ConfigError, match="task="):
        validate(compose_cfg(["task=pretrain"], tmp_path))


def test_path_safe_folder_names():
    from kdx.sweep.folders import path_safe

    assert path_safe("distill/teacher_transform=topk_scale,distill=kd") == "distill.teacher_transform=topk_scale,distill=kd"
    long = path_safe("x" * 400)
    assert len(long) == 180 and "/" not in long and long != path_safe("x" * 399)


def test_sweep_over_a_nested_group_writes_one_folder_per_job(tmp_path):
    """distill/teacher_transform=... in a multirun: one job folder (no sub-folder from the '/'), labelled."""
    from conftest import TINY, run_cli

    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "distill=kd", "distill/teacher_transform=topk_scale", "distill.teacher_transform.k=3",
                    f"hydra.sweep.dir={sweep}", f"paths.teachers={tmp_path / 'teachers'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert job.name.startswith("0_") and "distill.teacher_transform=topk_scale" in job.name
    results = json.loads((job / "results.json").read_text())
    assert results["method"] == "kd+topk_scale" and results["config"]["distill"]["teacher_transform"]["k"] == 3
    assert "kd+topk_scale" in (sweep / "results.md").read_text()  # the sweep-end report (kdx.report)


@pytest.mark.parametrize(
    "overrides, label",
    [
        (["distill=kd"], "kd"),
        (["distill=kd", "distill/teacher_transform=topk_scale"], "kd+topk_scale"),
        (["distill=dkd", "distill/teacher_transform=topk_scale"], "dkd+topk_scale"),
        (["distill=dkd", "teacher=reffakd"], "dkd@reffakd"),
        (["distill=reffakd"], "reffakd"),
        (["distill=none"], "none"),
        (["experiment=cifar100/reffakd/resnet18", "distill=none"], "none"),  # the baseline column of that sweep
    ],
)
def test_method_label_names_transform_and_table_teacher(tmp_path, overrides, label):
    """Runs that differ only by a teacher transform or a table teacher get distinct labels in results/tables."""
    cfg = compose_cfg(overrides, tmp_path)
    assert cfg.method == label


def test_sweep_report_lists_student_runs_only(tmp_path):
    """A ReffAKD stage-A record inside a job folder is an artifact, not a run; a job without results is missing."""
    from kdx.report import scan

    run_rec = {"status": "complete", "task": "distill", "method": "reffakd", "dataset": "d", "student": "s",
               "test_acc1_best": 50.0, "test_acc1_last": 49.0}  # (a record without any test accuracy is a failure)
    (tmp_path / "0_job" / "reffakd_ae").mkdir(parents=True)
    (tmp_path / "0_job" / "results.json").write_text(json.dumps(run_rec))
    (tmp_path / "0_job" / "reffakd_ae" / "results.json").write_text(json.dumps({"status": "complete", "task": "reffakd_ae"}))
    (tmp_path / "1_job" / ".hydra").mkdir(parents=True)
    done, missing = scan([tmp_path])
    assert [r.data for r in done] == [run_rec] and [u.folder for u in missing] == [tmp_path / "1_job"]


def test_kd_crd_keeps_its_own_settings_under_kds_recipes(tmp_path):
    """kd_crd has its own recipe lookup: KD+LS's per-pair temperature (a kd recipe) does not leak into it."""
    cfg = check(compose_cfg(["experiment=cifar100/ls/res32x4_res8x4", "distill=kd_crd"], tmp_path))
    assert (cfg.distill.temperature, cfg.distill.w_ce, cfg.distill.w_kd) == (4.0, 1.0, 0.9)
    cfg = check(compose_cfg(["experiment=cifar100/ls/res32x4_res8x4", "distill=kd"], tmp_path))
    assert cfg.distill.temperature == 2.0
