"""The paper recipes compose for every method, so one command line fans out a whole paper table.

``python -m kdx -m experiment=cifar100/dkd/<pair>,... distill=none,kd_crd,dkd,topkd,afd,rtk,reffakd seed=0,1,2``
must give every job a valid config with the pair's recipe, whatever method the job uses.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from kdx.cli import CONFIG_DIR
from kdx.config import resolved, validate

EXPERIMENTS = sorted(
    str(p.relative_to(Path(CONFIG_DIR) / "experiment").with_suffix(""))
    for p in (Path(CONFIG_DIR) / "experiment" / "cifar100" / "dkd").glob("*.yaml")
)
TEACHER_METHODS = ["none", "kd", "kd_crd", "dkd", "topkd", "afd", "rtk", "reffakd"]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def _compose(overrides: list[str]):
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    validate(cfg)
    return resolved(cfg)


def test_every_pair_of_the_dkd_table_is_a_recipe():
    assert len(EXPERIMENTS) == 11  # the DKD table's 11 pairs (one file each; any method runs on them)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_composes_with_every_teacher_method(experiment):
    pair_file = (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    for method in TEACHER_METHODS:
        cfg = _compose([f"experiment={experiment}", f"distill={method}"])
        assert cfg.method == method
        assert cfg.trainer.max_epochs == 240 and cfg.data.name == "cifar100"
        assert list(cfg.scheduler.milestones) == [150, 180, 210]
        assert f"override /model: {cfg.model.name}\n" in pair_file  # the pair is the recipe's, whatever the method
        assert cfg.method == "reffakd" or f"override /teacher_arch: {cfg.teacher.model.name}\n" in pair_file
        assert cfg.paper.teacher is not None and cfg.paper.student is not None
    assert _compose([f"experiment={experiment}"]).method == "dkd"  # the table's own method is the default


def test_dkd_pair_beta_reaches_dkd_but_not_other_methods():
    dkd = _compose(["experiment=cifar100/dkd/wrn40_2_wrn16_2", "distill=dkd"])
    assert dkd.distill.beta == 6.0  # the pair's β (docs/methods.md#dkd), not the default 8
    afd = _compose(["experiment=cifar100/dkd/wrn40_2_wrn16_2", "distill=afd"])
    assert afd.distill.beta == 200.0  # AFD's own β is unaffected by the DKD recipe
    assert afd.model.name == "wrn_16_2" and afd.teacher.model.name == "wrn_40_2"
