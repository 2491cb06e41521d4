# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FASHION_DIR := /usr/share/datasets/fashion-mnist
# The CPU wheel of torch lies here on our machines; elsewhere pip takes torch==2.13.0 from the index.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install data demo test lint up dvc-repro clean cluster-up cluster-down cluster-test cluster-faults

$(BIN)/shrinkflow: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "Python 3.11 is needed (set PY=/path/to/python3.11)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_FLAGS) --upgrade pip
	$(BIN)/pip install -q $(PIP_FLAGS) "torch==2.13.0"
	$(BIN)/pip install -q $(PIP_FLAGS) -e ".[dev]"
	touch $@

install: $(BIN)/shrinkflow

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
