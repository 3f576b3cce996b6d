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

.PHONY: install run test test-fast test-slow report clean-outputs

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

# Quality on real data (~35 minutes on 2 CPU cores): every method on the same small budget on the CIFAR-10 copy,
# 2 seeds, then a short data-free NAYER run, and one results table (multirun/bench-quality/results.md).
# Resumable: re-running skips finished jobs. QUALITY_METHODS / QUALITY_SEEDS narrow it.
QUALITY_METHODS ?= none,kd,dkd,topkd,reffakd,afd,rtk
QUALITY_SEEDS ?= 0,1
bench-quality: install
	$(BIN)/python -m kdx -m experiment=cifar10/quality distill=$(QUALITY_METHODS) seed=$(QUALITY_SEEDS) \
		resume=auto sweep_name=bench-quality-cifar10 logger=csv progress_bar=none
	$(BIN)/python -m kdx -m experiment=cifar10/nayer_quick trainer.max_epochs=6 seed=$(QUALITY_SEEDS) \
		resume=auto sweep_name=bench-quality-nayer logger=csv progress_bar=none
	$(BIN)/python -m kdx.report multirun/bench-quality-cifar10 multirun/bench-quality-nayer --out multirun/bench-quality
