# pvc.cluster: one entry point for set-up, tests, the lab, the demo and the benchmarks.
# Everything runs as root on a Debian 12 machine; `make setup` installs what is missing.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
WORK ?= /tmp/pvc-cluster
LAB_HOSTS ?= 3
# make demo KEEP=1 leaves the demo's lab up for exploring (make demo-down ends it)
KEEP ?=

.PHONY: help setup host venv wheelhouse guest test test-pytest test-model test-lint test-oldest-ansible test-sanity test-units test-integration lab-up lab-down demo demo-down bench clean

help:
	@echo "make test     set up this machine and run every test (pytest, the protocol model, ansible-test sanity, units and integration, ruff, mypy, ansible-lint)"
	@echo "make test-model   check the migration and fence-and-recover protocols' Promela model with spin (models/ha.pml)"
	@echo "make demo     set up this machine, bring up a 3-host lab and run the demo (KEEP=1: leave the lab up; make demo-down ends it)"
	@echo "make lab-up / lab-down   the network-namespace lab (LAB_HOSTS=$(LAB_HOSTS))"
	@echo "make bench    benchmarks, written to bench/results/latest.json (bench p runs Ganeti's hail, which make setup installs)"
	@echo "make wheelhouse   the node daemon's wheelhouse for the node_daemon role (dist/wheelhouse)"
	@echo "make guest    build (or find in its cache) the lab's real guest: a Debian cloud kernel and a busybox initramfs"

setup: host venv

host:
	bash scripts/setup-host.sh

# The venv is rebuilt when the dependencies or their pins (constraints.txt) change.
$(VENV)/.stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q --constraint constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

test: setup test-pytest test-model test-sanity test-units test-integration test-lint test-oldest-ansible
	@echo "make test: all suites passed"

test-pytest:
	$(VPY) -m pytest -ra

# The Promela model of the migration and fence-and-recover protocols, checked with spin: every
# configuration must verify and every deliberately broken variant must give a counterexample
# (docs/migration-protocol.md, "The model").
test-model:
	bash scripts/check-model.sh

# ruff (the rules in pyproject.toml, and its formatter's check) on every Python file; mypy, strict (pyproject.toml), on the shared
# code and the daemon as the packages they are installed as: pvc_cluster_common and pvc_node_daemon,
# linked in .venv/mypy-path (mypy cannot follow the editable install's package-dir mapping).
# Then ansible-lint, production profile (.ansible-lint), on every role, playbook and integration
# target; the collection is found through a collections path in .venv that points at this checkout.
test-lint: venv
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --check --no-cache .
	mkdir -p $(VENV)/mypy-path
	ln -sfn $(CURDIR)/plugins/module_utils $(VENV)/mypy-path/pvc_cluster_common
	ln -sfn $(CURDIR)/node_daemon $(VENV)/mypy-path/pvc_node_daemon
	MYPYPATH=$(CURDIR)/$(VENV)/mypy-path $(VENV)/bin/mypy --cache-dir $(VENV)/mypy-cache -p pvc_cluster_common -p pvc_node_daemon
	mkdir -p $(VENV)/collections/ansible_collections/pvc
	ln -sfn $(CURDIR) $(VENV)/collections/ansible_collections/pvc/cluster
	ANSIBLE_COLLECTIONS_PATH=$(CURDIR)/$(VENV)/collections $(VENV)/bin/ansible-lint --nocolor

# The oldest ansible-core meta/runtime.yml accepts (requires_ansible): sanity and units run on it too,
# in a venv of its own with the modules' kazoo and lxml at their pins.
ANSIBLE_OLDEST := 2.16.19
OLDEST_VENV := $(VENV)/ansible-$(ANSIBLE_OLDEST)
$(OLDEST_VENV)/.stamp: $(VENV)/.stamp
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q ansible-core==$(ANSIBLE_OLDEST) $$(grep -E '^(kazoo|lxml)==' constraints.txt)
	touch $@

test-oldest-ansible: $(OLDEST_VENV)/.stamp
	PVC_ANSIBLE_VENV=$(CURDIR)/$(OLDEST_VENV) bash scripts/ansible-test.sh sanity
	PVC_ANSIBLE_VENV=$(CURDIR)/$(OLDEST_VENV) bash scripts/ansible-test.sh units

test-units: tests/unit/requirements.txt

# integration: the modules and the inventory plugin against ZooKeeper and 3 node daemons
# (libvirt's test driver) that scripts/ansible-test.sh starts and stops around ansible-test.
test-sanity test-units test-integration:
	bash scripts/ansible-test.sh $(patsubst test-%,%,$@)

# What the unit tests need besides ansible-core, pinned as constraints.txt pins it.
tests/unit/requirements.txt: constraints.txt
	$(PYTHON) -c 'import sys; pins = [l.strip() for l in open("constraints.txt") if l.split("==")[0] in ("kazoo", "lxml")]; \
	  print("# What the unit tests import besides ansible-core, pinned as in constraints.txt (`make` regenerates"); \
	  print("# this file from there: see the Makefile target tests/unit/requirements.txt)."); \
	  print("\n".join(pins))' >$@

# The node daemon's wheelhouse, which the node_daemon role installs from offline (docs/node-daemon.md).
# WHEELHOUSE_LIBVIRT=1 adds a libvirt-python wheel compiled here, for nodes without Debian's python3-libvirt.
WHEELHOUSE ?= dist/wheelhouse
WHEELHOUSE_LIBVIRT ?=
wheelhouse: venv
	$(VPY) scripts/build-wheelhouse.py $(WHEELHOUSE) $(if $(WHEELHOUSE_LIBVIRT),--with-libvirt)

# The lab's real guest, from Debian packages (tests/lab/guest_image.py); cached in $(WORK)/guest, so a
# second run only checks. The lab tests, the demo and the benchmarks build it themselves when needed.
guest: setup
	$(VPY) -m tests.lab.guest_image --cache $(WORK)/guest

lab-up: setup
	$(VPY) -m tests.lab up --hosts $(LAB_HOSTS) --workdir $(WORK)/lab

lab-down:
	$(VPY) -m tests.lab down --workdir $(WORK)/lab

# The demo (tests/lab/demo.py): rollout, six VMs, a rolling maintenance of node1, and where each VM ran.
demo: setup
	$(VPY) -m tests.lab.demo --workdir $(WORK)/demo $(if $(KEEP),--keep)

demo-down:
	$(VPY) -m tests.lab.demo --down --workdir $(WORK)/demo

bench: setup
	$(VPY) -m bench

clean: lab-down
	rm -rf $(VENV) $(WORK)
