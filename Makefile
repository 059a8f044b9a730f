# Two front-door commands: `make demo` and `make test`. Both build a local .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

# torch is pinned and installed first: the CPU wheel for 2.13.0 is on local disk, any other
# spec would pull a multi-GB CUDA build. The stamp makes a second run instant.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[train,hf,dev]"
	# torchtitan for the tests of its integration. --no-deps: torchtitan 0.3.0 pins datasets<4.8,
	# which would downgrade huggingface-hub below what transformers needs; its MoE layers need only
	# spmd_types, tyro and (imported on every device) triton
	$(BIN)/python -m pip install --quiet --no-deps "torchtitan==0.3.0"
	$(BIN)/python -m pip install --quiet "spmd_types==0.2.3" "tyro>=0.9" "triton>=3.0"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moe-balance demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The speed table: shapes A, B, Bs in fp32 and bf16 against the dense reference and the peers
bench: $(STAMP)
	$(BIN)/moe-balance bench

clean:
	rm -rf $(VENV) runs .pytest_cache
