# celery-bench: every target installs what it needs from nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install bench check test gate microbench locust clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# constraints.txt pins every dependency to the versions the committed baseline was measured
# with: the gate refuses to compare instruction counts across celery/kombu/python versions.
# $(call apt_need,COMMAND,DEBIAN_PACKAGE,WHAT IS SKIPPED WITHOUT IT): install the package as
# root with apt when COMMAND is missing; otherwise say what goes without it.
apt_need = command -v $(1) >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null || \
    echo "make: $(2) could not be installed; $(3)"; \
  else echo "make: no $(2) (needs root and apt-get); $(3)"; fi; }

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@# valgrind counts instructions for the CI gate (--instructions); without it those rules
	@# say "not measured: valgrind not installed". The HTML report's browser tests drive
	@# Debian's chromium through playwright (never 'playwright install'). The multi-host Locust
	@# tests build network namespaces with iproute2 (tests/netns.py). Without root or apt
	@# each is skipped with the reason (the tests fail instead if CI=true).
	@$(call apt_need,valgrind,valgrind,instruction counts will be skipped)
	@$(call apt_need,chromium,chromium,the browser tests will skip)
	@$(call apt_need,ip,iproute2,the multi-host tests will skip)
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with every dependency

bench: $(STAMP)  ## run the quick default suite, write results/latest.json
	$(BIN)/celery-bench run --quick --out results/latest.json $(ARGS)

check: $(STAMP)  ## the fast tier: no services, browser, valgrind or CLI subprocesses (<60 s)
	$(BIN)/python -m pytest -m "not slow" --timeout 20 --timeout-method signal $(ARGS)

test: $(STAMP)  ## run the full test suite (real Redis, RabbitMQ, PostgreSQL); CI runs this
	$(BIN)/python -m pytest $(ARGS)

gate: $(STAMP)  ## check results/latest.json against results/baselines/gates.toml
	$(BIN)/celery-bench gate results/latest.json

microbench: $(STAMP)  ## pytest-benchmark timings of the harness's own hot spots
	$(BIN)/python -m pytest tests/test_microbench.py --benchmark-only $(ARGS)

locust: $(STAMP)  ## Locust web UI on 127.0.0.1:8089 (celery-bench tab: exact latencies)
	$(BIN)/locust --config locust.conf $(ARGS)

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) results/latest.json results/runs .pytest_cache
