"""The architecture's promises: no import cycles, one rank answer, declared seams (no probing), regimes as a
config group, validated recipes and values, and an honest teacher store with its command."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, run_cli
from kdx.config import validate
from kdx.dist import local_rank, rank
from kdx.errors import ConfigError
from kdx.run import build_job, run
from kdx.teachers.store import TeacherStore

PKG = ROOT / "kdx"


# ------------------------------------------------------------------------------------------ imports
def _module_graph() -> dict[str, set[str]]:
    """kdx's modules and the kdx modules each imports (module level and inside functions alike)."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in PKG.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        base = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                stem = node.module or ""
                if node.level:
                    up = base
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    stem = f"{up}.{stem}" if stem else up
                names = [stem] + [f"{stem}.{a.name}" for a in node.names]
            for name in names:
                dep = owner(name) if name.split(".")[0] == "kdx" else None
                # a package's __init__ and its children are one unit (a child importing its package is normal)
                if dep and dep != mod and not mod.startswith(dep + ".") and not dep.startswith(mod + "."):
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _module_graph()
    assert len(graph) > 50 and graph["kdx.build"] >= {"kdx.config", "kdx.teachers.store"}  # the walk sees imports
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # and the search finds a cycle
    assert _cycles(graph) == []


ORCHESTRATION = ["build.py", "run.py", "results.py", "regimes/base.py", "regimes/distill.py", "regimes/datafree.py",
                 "regimes/step.py", "teachers/cache.py", "callbacks.py"]


@pytest.mark.parametrize("path", ORCHESTRATION)
def test_orchestration_reads_declared_capabilities_only(path):
    """No getattr/hasattr probing and no branching on a method's name where the orchestration reads strategies,
    teachers, datamodules and regimes: what it reads is declared on their base classes."""
    text = (PKG / path).read_text()
    assert not re.findall(r"\b(getattr|hasattr)\(", text)
    assert not re.findall(r"method\s*==|== *\"(none|kd|dkd|nayer|reffakd)\"", text)


# ------------------------------------------------------------------------------------------ ranks
@pytest.mark.parametrize("env, want", [
    ({}, 0),
    ({"RANK": "3", "LOCAL_RANK": "1"}, 3),                                 # torchrun, submitit-local export
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, 5),  # a task of a multi-node SLURM job
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, 0),                        # a single-task allocation
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, 1),          # Lightning's popen child
    ({"NODE_RANK": "1", "WORLD_SIZE": "4", "NUM_NODES": "2"}, 2),           # node 1's launching process
    ({"LOCAL_RANK": "1", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 3),
])
def test_one_rank_answer_for_every_launcher(env, want):
    assert rank(env) == want


def test_local_rank():
    assert local_rank({"SLURM_NTASKS": "4", "SLURM_LOCALID": "2"}) == 2
    assert local_rank({"LOCAL_RANK": "1"}) == 1 and local_rank({}) == 0


# ------------------------------------------------------------------------------------------ regimes
def test_datafree_regime_takes_the_top_level_optimiser(tmp_path, teacher_ckpt):
    """distill=nayer selects module=datafree and its official SGD; optim=adamw trains the student with AdamW."""
    base = TINY + ["distill=nayer", f"teacher.ckpt={teacher_ckpt}", "distill.synthesis_batch_size=20",
                   "distill.lte.table=cifar10", "distill.lte.check_names=false"]
    official = build_job(compose_cfg(base, tmp_path, "sgd"))
    assert type(official.module).__name__ == "DataFreeModule"
    opt = official.module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.2 and opt.defaults["weight_decay"] == 1e-4
    adamw = build_job(compose_cfg(base + ["optim=adamw"], tmp_path, "adamw")).module.configure_optimizers()
    assert isinstance(adamw["optimizer"], torch.optim.AdamW)


@pytest.mark.parametrize("overrides, match", [
    (["distill=nayer", "module=distill"], "runs in the 'datafree' regime.*module=datafree"),
    (["distill=kd", "module=datafree"], "runs in the 'distill' regime.*module=distill"),
])
def test_a_strategy_in_the_wrong_regime_is_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_job(compose_cfg(TINY + overrides, tmp_path))
    assert not (tmp_path / "teachers").exists()  # refused before any teacher was trained


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("override, match", [
    ("+distill.betta=3", r"Unknown key 'distill.betta'.*Did you mean 'distill.beta'"),
    ("+teacher.train.max_epoch=3", r"Did you mean 'teacher.train.max_epochs'"),
    ("+teacher.train.lrr=0.1", r"Unknown key 'teacher.train.lrr'.*Valid keys of teacher.train: max_epochs, optim"),
    ("+teacher.train.optim.momentun=0.8", r"Did you mean 'teacher.train.optim.momentum'"),
    ("+module.warmpu=3", r"Unknown key 'module.warmpu'"),
    ("+perf.chanels_last=true", r"Did you mean 'perf.channels_last'"),
    ("+teacher_cache.view=3", r"Unknown key 'teacher_cache.view'"),
])
def test_misspelt_keys_stop_at_start_up_naming_the_closest_key(tmp_path, override, match):
    extra = ["distill=dkd", "teacher.train.optim={_target_: torch.optim.SGD, _partial_: true, lr: 0.1}"]
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(TINY + extra + [override], tmp_path))


def test_a_misspelt_key_in_a_recipe_file_stops_naming_the_closest_key(tmp_path):
    """A user's experiment with a recipe for DKD (conf/recipe/dkd/<experiment>.yaml) that misspells beta."""
    conf = tmp_path / "myconf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "recipe" / "dkd").mkdir(parents=True)
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\ntrainer:\n  max_epochs: 1\n")
    (conf / "recipe" / "dkd" / "mine.yaml").write_text("betta: 3.0\n")
    r = run_cli(["--config-dir", str(conf), "experiment=mine", "distill=dkd", *TINY[:-1], "progress_bar=none",
                 f"hydra.run.dir={tmp_path / 'run'}", f"paths.teachers={tmp_path / 'teachers'}"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Did you mean 'distill.beta'" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr


def test_the_pair_recipe_reaches_the_method(tmp_path):
    for pair, beta in (("res32x4_res8x4", 8.0), ("res56_res20", 2.0), ("vgg13_vgg8", 6.0)):
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}"], tmp_path)
        assert cfg.distill.beta == beta
    assert compose_cfg(["experiment=cifar100/dkd/res56_res20", "distill.beta=3"], tmp_path).distill.beta == 3
    assert compose_cfg(["experiment=cifar10/quality", "distill=dkd"], tmp_path).distill.warmup == 2
    assert compose_cfg(["experiment=cifar10/quality", "distill=topkd"], tmp_path).distill.k == 3


@pytest.mark.parametrize("override, match", [
    ("trainer.max_epochs=-1", r"trainer.max_epochs=-1: .*positive integer"),
    ("trainer.max_epochs=0", r"trainer.max_epochs=0"),
    ("data.batch_size=0", r"data.batch_size=0: .*>= 1"),
])
def test_impossible_values_stop_with_one_line_naming_the_setting(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        build_job(compose_cfg(TINY + [override], tmp_path))


def test_an_unwritable_output_folder_is_one_line_through_the_cli():
    """/proc takes no new folders, not even from root: Hydra would fail creating the run folder with a traceback."""
    r = run_cli([*TINY, "hydra.run.dir=/proc/kdx-test/run"])
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot be written" in out and "hydra.run.dir" in out and "Traceback" not in out


# ------------------------------------------------------------------------------------------ the teacher store
def test_a_cut_short_run_never_enters_the_store_and_entries_are_never_overwritten(tmp_path, caplog):
    caplog.set_level("INFO")
    short = run(compose_cfg(TINY + ["distill=none", "trainer.limit_train_batches=2"], tmp_path, "short"))
    assert short["budget"]["complete"] is False and "limit_train_batches=2" in short["budget"]["cut"]
    assert TeacherStore(tmp_path / "teachers").lookup("synthetic", "resnet8") is None
    assert "Not storing" in caplog.text
    full = run(compose_cfg(TINY + ["distill=none"], tmp_path, "full"))
    stored = TeacherStore(tmp_path / "teachers").lookup("synthetic", "resnet8")
    assert full["budget"]["complete"] and stored is not None and stored[1]["budget"]["epochs_done"] == 1
    first = stored[1]["sha256"]
    run(compose_cfg(TINY + ["distill=none", "seed=1"], tmp_path, "again"))
    assert TeacherStore(tmp_path / "teachers").lookup("synthetic", "resnet8")[1]["sha256"] == first
    assert "never overwritten" in caplog.text


def test_a_distillation_with_a_cut_short_teacher_uses_it_but_does_not_store_it(tmp_path):
    res = run(compose_cfg(TINY + ["distill=kd", "trainer.limit_train_batches=2"], tmp_path))
    assert res["status"] == "complete" and res["teacher_info"]["budget"]["complete"] is False
    assert TeacherStore(tmp_path / "teachers").entries() == []


def test_the_store_command_lists_shows_and_removes(teacher_store, tmp_path):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(teacher_store, root)
    cmd = [sys.executable, "-m", "kdx.teachers", "--root", str(root)]
    listed = subprocess.run(cmd + ["list"], capture_output=True, text=True)
    assert listed.returncode == 0 and re.search(r"synthetic\s+resnet8\s+\d", listed.stdout) and "yes" in listed.stdout
    shown = subprocess.run(cmd + ["show", "synthetic", "resnet8"], capture_output=True, text=True)
    meta = json.loads(shown.stdout)
    assert meta["arch"] == "resnet8" and meta["budget"]["complete"] and Path(meta["weights"]).is_file()
    gone = subprocess.run(cmd + ["remove", "synthetic", "resnet8"], capture_output=True, text=True)
    assert gone.returncode == 0 and not (root / "synthetic" / "resnet8").exists()
    missing = subprocess.run(cmd + ["show", "synthetic", "resnet8"], capture_output=True, text=True)
    assert missing.returncode == 2 and "No stored teacher" in missing.stderr


@pytest.mark.slow
def test_a_two_task_ddp_launch_trains_its_missing_teacher_once(tmp_path):
    """hydra/launcher=kdx_local with trainer=ddp_cpu and an empty teacher store: both tasks take part in training
    the teacher (rank 0 alone holds the store's lock and writes it), then distil; one teacher run, one entry."""
    args = ["-m", *TINY, "trainer=ddp_cpu", "distill=kd", "hydra/launcher=kdx_local", "resume=auto",
            "sweep_name=ddpteacher", f"paths.teachers={tmp_path / 'teachers'}"]
    r = run_cli(args, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    sweep = tmp_path / "multirun" / "ddpteacher"
    (job,) = [p.parent for p in sweep.rglob(".hydra") if "teacher" not in p.parent.relative_to(sweep).parts]
    res = json.loads((job / "results.json").read_text())
    assert res["status"] == "complete" and res["method"] == "kd" and res["epochs_done"] == 1
    teacher_runs = [p for p in sweep.rglob("results.json") if p.parent.name == "teacher"]
    assert len(teacher_runs) == 1 and json.loads(teacher_runs[0].read_text())["task"] == "train"
    stored = TeacherStore(tmp_path / "teachers").entries()
    assert [(k, a) for k, a, _ in stored] == [("synthetic", "resnet8")]
    assert res["teacher_info"]["sha256"] == stored[0][2]["sha256"]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
