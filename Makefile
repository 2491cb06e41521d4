# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FASHION_DIR := /usr/share/datasets/fashion-mnist
# The CPU wheel of torch lies here on our machines; elsewhere pip takes torch==2.13.0 from the index.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install lock data demo test lint up dvc-repro clean cluster-up cluster-down cluster-test cluster-faults

$(BIN)/shrinkflow: pyproject.toml infra/constraints.txt
	@command -v $(PY) >/dev/null || { echo "Python 3.11 is needed (set PY=/path/to/python3.11)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_FLAGS) --upgrade pip
	$(BIN)/pip install -q $(PIP_FLAGS) "torch==2.13.0"
	$(BIN)/pip install -q $(PIP_FLAGS) -c infra/constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/shrinkflow

# Re-pin infra/constraints.txt: resolve pyproject.toml's ranges afresh in a scratch venv, then freeze.
# LOCK_HINTS narrows what pip would otherwise backtrack over for minutes (boto3 must accept the botocore
# of the newest aiobotocore that s3fs takes); widen it when aiobotocore moves on.
LOCK_HINTS ?= boto3>=1.43.115,<1.43.118
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q $(PIP_FLAGS) --upgrade pip
	.lock-venv/bin/pip install -q $(PIP_FLAGS) "torch==2.13.0"
	.lock-venv/bin/pip install -q $(PIP_FLAGS) -e ".[dev]" $(foreach h,$(LOCK_HINTS),"$(h)")
	{ sed -n '/^#/p' infra/constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > infra/constraints.txt.new
	mv infra/constraints.txt.new infra/constraints.txt && rm -rf .lock-venv

# Fashion-MNIST comes from Debian's dataset-fashion-mnist: installed when we are root, else we say how.
data:
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; \
	  fi; \
	fi

demo: install data arm-device
	$(BIN)/shrinkflow run fashion_resnet

# `make test` starts and stops a small cluster of its own (tests/cluster/test_cluster_smoke.py); the
# tests below need the long-running one (cluster-test) or take ~10 min (cluster-faults).
test: install data
	$(BIN)/python -m pytest -q -m "not cluster and not cluster_faults"

# The scale-out topology (README "Scaling out"): `infra/local-cluster.sh up`, then `make cluster-test`.
cluster-up: install
	infra/local-cluster.sh up

cluster-down:
	infra/local-cluster.sh down

cluster-test: install data
	$(BIN)/python -m pytest -q -m cluster tests/cluster

# Faults (a worker killed mid-trial, MLflow down for 30 s, concurrent runs): a cluster of their own, so
# run them with no cluster up.
cluster-faults: install data
	$(BIN)/python -m pytest -q -m cluster_faults tests/cluster

lint: install
	$(BIN)/ruff check .

up: install
	$(BIN)/shrinkflow up

dvc-repro: install
	$(BIN)/dvc repro

clean:
	rm -rf .shrinkflow

# The emulated aarch64 device: qemu-user running an aarch64 Python with the aarch64 TVM wheel as a
# TVM RPC server on 127.0.0.1:$(ARM_PORT) (infra/devices.yaml's aarch64_neon). Stop it with
# `infra/arm/rpc_device.sh stop`. Times measured on it are emulated, not ARM hardware speed.
.PHONY: arm-device
ARM_PORT ?= 9190
arm-device: install
	infra/arm/setup_device.sh
	infra/arm/rpc_device.sh start $(ARM_PORT)
