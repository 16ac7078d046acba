# VTL: set-up, demo and tests on a fresh Debian machine (run as root).
#   make demo   - install everything, then run `vtl demo`
#   make test   - install everything, then ruff and the whole test suite

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := libpcap-dev libudt-dev iproute2 iputils-ping iperf3 curl tcpdump tshark \
	dante-server dnsmasq-base netcat-openbsd ethtool procps gcc g++ make python3-dev python3-venv \
	qemu-system-x86 busybox-static traceroute iputils-tracepath nftables
PYTEST_ARGS ?=

.PHONY: all setup system-deps guest demo test lint bench clean

all: test

# System packages: installed once per machine, re-checked cheaply each run.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

# setup.py and the C++ source: the native extension (vtl.bridge.transports._udtcc) rebuilds
$(VENV)/.installed: pyproject.toml setup.py bridge/transports/udtcc.cpp | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# udt4py 1.2 does not declare its build needs; it builds against libudt-dev.
	$(BIN)/pip install -q "cython<3" wheel setuptools
	$(BIN)/pip install -q --no-build-isolation udt4py==1.2
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: system-deps $(VENV)/.installed

# The real-VM test guest (kernel + busybox initramfs) in .cache/guest/; a no-op when up to date.
guest: system-deps
	$(PYTHON) tools/guest/build.py

demo: setup
	$(BIN)/vtl demo

lint: setup
	$(BIN)/ruff check .

test: setup lint guest
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/bridge.py

clean:
	rm -rf $(VENV) build *.egg-info
