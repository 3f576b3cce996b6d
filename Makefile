# kdx: `make run` (install + a real small distillation) and `make test` (install + the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact builds pip serves on the project's machines; override for another platform, e.g.
#   make install TORCH_PINS="torch torchvision"
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

# No hub look-ups (they retry for ~45 s offline); W&B writes runs locally unless told otherwise.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install run test test-fast test-slow report clean-outputs bench bench-quality bench-quality-cifar10 bench-datafree gpu-check

install: $(VENV)/.kdx-installed

$(VENV)/.kdx-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# The mission's command on real CIFAR-100 (the shared exact copy), CPU-sized: trains a resnet20 teacher once (3
# epochs; stored, reused after), then the resnet8 baseline, KD, DKD and TopKD students (2 epochs each on the full
# training set), and prints the table. About 10 minutes on 2 CPU cores from an empty teacher store (README).
RUN_METHODS ?= none,kd,dkd,topkd
run: install
	$(BIN)/python -m kdx -m experiment=cifar100/quickstart distill=$(RUN_METHODS)

# The whole suite (synthetic data of the real shapes, the small real data in ../shared/data, DDP on CPU).
test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Without the slow end-to-end checks (DDP, real data).
test-fast: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The results table (results.md, results.csv, PNGs) of a sweep, written into it: SWEEP=<folder>, else the
# newest sweep under multirun/ (by its multirun.yaml, which Hydra writes when the sweep starts).
REPORT_ARGS ?=
report: install
	@sweep="$(SWEEP)"; \
	if [ -z "$$sweep" ]; then \
		latest=$$(ls -t multirun/*/*/multirun.yaml multirun/*/multirun.yaml 2>/dev/null | head -n 1); \
		sweep=$${latest%/multirun.yaml}; \
	fi; \
	if [ -z "$$sweep" ]; then echo "make report: no sweep under multirun/; use make report SWEEP=<folder>" >&2; exit 2; fi; \
	$(BIN)/python -m kdx.report "$$sweep" $(REPORT_ARGS)

clean-outputs:
	rm -rf outputs multirun/*/

# Speed: kdx's full training path vs a bare PyTorch loop, per method, pair and precision (a table + JSON lines).
BENCH_ARGS ?= --data --cache
bench: install
	$(BIN)/python -m kdx.bench $(BENCH_ARGS)

# Quality on real CIFAR-100 (README: what it ran, the numbers, the time on 2 CPU cores): every method on `make run`'s
# budget (its stored resnet20 teacher; resnet8 students, 2 epochs on the full training set). The methods kdx had
# before the baselines (none, kd, dkd, topkd, reffakd, afd, rtk, kd+topk_scale, and the data-free nayer on the same
# teacher) over 3 seeds, every later baseline over 1; one table (multirun/bench-quality/results.md). Resumable:
# re-running skips finished jobs. QUALITY_CORE / QUALITY_BASELINES / the *_SEEDS narrow or widen it.
QUALITY_CORE ?= none,kd,dkd,topkd,reffakd,afd,rtk
QUALITY_CORE_SEEDS ?= 0,1,2
# CRD is left out by default: about 26 minutes a job on 2 CPU cores (its 16,384-negative memory bank); add it with
# QUALITY_BASELINES=...,crd. The plan below is about 95 minutes on 2 cores by the measured job times (README).
QUALITY_BASELINES ?= kd_crd,dist,nkd,ttm,wttm,sdd_kd,sdd_dkd,ctkd,mlkd,fitnet,at,sp,pkt,rkd,nst,vid,reviewkd,ofd
QUALITY_BASELINE_SEEDS ?= 0
QUALITY_FLAGS = resume=auto logger=csv progress_bar=none
bench-quality: install
	$(BIN)/python -m kdx -m experiment=cifar100/quality distill=$(QUALITY_CORE) seed=$(QUALITY_CORE_SEEDS) \
		sweep_name=bench-quality $(QUALITY_FLAGS)
	$(BIN)/python -m kdx -m experiment=cifar100/quality distill=kd distill/teacher_transform=topk_scale \
		seed=$(QUALITY_CORE_SEEDS) sweep_name=bench-quality-tsm $(QUALITY_FLAGS)
	$(BIN)/python -m kdx -m experiment=cifar100/nayer_quality seed=$(QUALITY_CORE_SEEDS) \
		sweep_name=bench-quality-nayer $(QUALITY_FLAGS)
	$(BIN)/python -m kdx -m experiment=cifar100/quality distill=$(QUALITY_BASELINES) seed=$(QUALITY_BASELINE_SEEDS) \
		sweep_name=bench-quality $(QUALITY_FLAGS)
	$(BIN)/python -m kdx.report multirun/bench-quality multirun/bench-quality-tsm multirun/bench-quality-nayer \
		--out multirun/bench-quality

# The earlier CIFAR-10 quality budget (~35 minutes): none,kd,dkd,topkd,reffakd,afd,rtk × 2 seeds on the CIFAR-10
# copy's 10,000-image subset, then a short data-free NAYER run (multirun/bench-quality-c10/results.md).
QUALITY_C10_METHODS ?= none,kd,dkd,topkd,reffakd,afd,rtk
bench-quality-cifar10: install
	$(BIN)/python -m kdx -m experiment=cifar10/quality distill=$(QUALITY_C10_METHODS) seed=0,1 \
		resume=auto sweep_name=bench-quality-cifar10 logger=csv progress_bar=none
	$(BIN)/python -m kdx -m experiment=cifar10/nayer_quick trainer.max_epochs=6 seed=0,1 \
		resume=auto sweep_name=bench-quality-nayer logger=csv progress_bar=none
	$(BIN)/python -m kdx.report multirun/bench-quality-cifar10 multirun/bench-quality-nayer --out multirun/bench-quality-c10

# The data-free comparison: NAYER against DeepInversion, CMI, Fast and DAFL on one teacher, one budget and one clock
# (python -m kdx.bench_datafree --dry-run prints the commands and the estimated time; DATAFREE_ARGS=--budget tiny
# for a quick pass).
DATAFREE_ARGS ?=
bench-datafree: install
	$(BIN)/python -m kdx.bench_datafree $(DATAFREE_ARGS)

# On a machine with a CUDA GPU: device, throughput of KD/DKD/TopKD/AFD (fp32, bf16, compile, data on the device),
# what bounds an epoch, then a short real CIFAR-100 teacher + KD run, in about 10 minutes. Without a GPU it says so
# and exits 0.
GPU_CHECK_ARGS ?=
gpu-check: install
	$(BIN)/python -m kdx.gpu_check $(GPU_CHECK_ARGS)
