# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# One torch thread per process unless you say otherwise: on a shared 2-core machine two threads measured 3x
# slower than one (digits SimSiam: 1948 vs 618 img/s). On a quiet many-core box try `make demo OMP_NUM_THREADS=4`.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

.PHONY: install demo test bench clean browser lint

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/alssl run pipelines/digits_demo.toml --out runs/digits_demo
	@echo "budget curve: runs/digits_demo/curve.csv  runs/digits_demo/curve.png  runs/digits_demo/curve.svg"

# The label-ui browser test (tests/test_labeling.py) drives Debian's chromium + chromium-driver with Selenium; a fresh
# machine gets them once from apt (as root, or through sudo). Without them that test fails: it is never skipped.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing chromium + chromium-driver for the browser test (apt-get)"; \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
	    </dev/null || { echo "error: could not install chromium chromium-driver; install them and rerun" >&2; exit 1; }; \
	fi

# pytest exit code 5 means "no tests collected": that is a failure here, not a success.
# Two pytest workers (one torch thread each) use both cores of the CI machine: 9.2 -> ~5 min here.
PYTEST_WORKERS ?= 2
test: $(STAMP) browser lint
	@$(PY) -m pytest -n $(PYTEST_WORKERS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# ruff's lint (pyproject.toml [tool.ruff]: pyflakes, pycodestyle errors, bugbear; line length 120) in under a second
lint: $(STAMP)
	$(VENV)/bin/ruff check alssl tests bench scripts

bench: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[bench]'
	$(PY) -m pip install --disable-pip-version-check -q --no-deps semilearn==0.3.2
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/kcenter.py
	$(PY) bench/semi_step.py
	$(PY) bench/embed.py

clean:
	rm -rf runs .pytest_cache
