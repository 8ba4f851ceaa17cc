# make setup [CUDA=1 [CUDA_ARCH=90]]   virtual environment, patched llama.cpp, this package, default model
# make data                           the long texts for perplexity runs (Shakespeare, King James Bible)
# make demo                           attention scores of a short text, then 2,048 tokens of Shakespeare
#                                     streamed through a 256-cell cache by inf-mllm and streaming-llm
# make test                           setup, then the test suite
# make test-fast                      the suite without the tests marked slow (the edit loop)
PY      := .venv/bin/python
CUDA    ?= 0
CUDA_ARCH ?=

.PHONY: setup data demo test test-fast clean

.venv/.deps: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q scikit-build-core 'cmake>=3.21' numpy gguf pillow typer matplotlib tqdm av \
		diskcache jinja2 typing-extensions fastapi uvicorn nvidia-ml-py pytest scikit-video pexpect openai selenium \
		import-linter hypothesis schemathesis jsonschema
	touch $@

# the server's page is tested in a real browser: Debian's chromium and its driver, where apt-get can
.browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
		echo "note: apt-get could not install chromium: the browser test will be skipped"; \
	else echo "note: no chromium here and no root apt-get: the browser test will be skipped"; fi
	touch $@

setup: .venv/.deps .browser
	CUDA=$(CUDA) CUDA_ARCH=$(CUDA_ARCH) PYTHON=$(PY) scripts/build_llama.sh
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m infmllm_gguf.model_files fetch
	$(PY) -m infmllm_gguf.data fetch

data: setup
	$(PY) -m infmllm_gguf.data fetch all

demo: setup
	.venv/bin/infmllm-gguf attention --text "The cat sat on the mat. The dog lay on the rug. Where did the cat sit?" --window 8
	.venv/bin/infmllm-gguf perplexity --file "$$($(PY) -c 'from infmllm_gguf.data import shakespeare_path as p; print(p())')" \
		--policy inf-mllm,streaming-llm --budget 256 --max-tokens 2048 --plot demo-perplexity.png

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m 'not slow' tests

clean:
	rm -rf .venv .browser build *.egg-info
