# `make test` works on a fresh machine: it creates .venv, installs the package with its
# test extras (compiling the Cython modules) and runs ruff, mypy and pytest.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SOURCES := $(wildcard engine/*.pyx engine/*.pxd engine/*.h) setup.py pyproject.toml

.PHONY: all install serve test lint typecheck unit unit-workers cluster-workers bench bench-http bench-peers peers debug-build \
	clean etcd wrk \
	dev-cluster soak faults fuse bench-cluster scale join backlog

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

# Build requirements live in the venv so that rebuilds need no isolated environment.
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py
	$(BIN)/python -m pip install -q "Cython>=3.1" "numpy>=2.0"
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

# Recompile the extensions in place whenever a .pyx/.pxd/.h changes.
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(BIN)/python setup.py -q build_ext --inplace -j 2
	touch $@

install: $(VENV)/.built

# The server on the embedded default: ./conveyor-data, http://127.0.0.1:9324.
serve: install
	$(BIN)/conveyor serve $(SERVE_ARGS)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

# The cluster tests run a real etcd: Debian's etcd-server, installed when it is missing
# (apt-get needs root; elsewhere install the package by hand).
etcd:
	@command -v etcd >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
			--no-install-recommends etcd-server; }

# The power-loss tests mount a FUSE file system (tests/support/powerfs.py): libfuse 3 and
# fusermount3 from Debian's fuse3, installed when missing (as for etcd above).
fuse:
	@command -v fusermount3 >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
			--no-install-recommends fuse3; }

# The HTTP benchmark's load generator for sends (bench/http_load.py): Debian's wrk,
# installed when missing (as for etcd above).
wrk:
	@command -v wrk >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
			--no-install-recommends wrk; }

# etcd and three nodes on loopback ports (http://127.0.0.1:9324-9326); Ctrl-C stops them.
dev-cluster: install etcd
	$(BIN)/conveyor dev-cluster --nodes 3 $(DEV_CLUSTER_ARGS)

# pytest exits 5 when it collects nothing; a run without tests is not a pass. The tests
# spend much of their time waiting on servers, kills and leases: two worker processes
# (pytest-xdist; PYTEST_WORKERS=0 runs them in one) keep two cores busy, a module's tests
# together on one worker, its shared servers started once. Each worker hands out loopback
# ports of its own (tests/support/server.py free_port).
PYTEST_WORKERS ?= 2
unit: install etcd fuse
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadscope \
		--durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

# The SQS and native API suites again, against servers of two workers (--workers 2).
WORKERS_SUITES = tests/server/sqs tests/server/web/test_native_api.py
unit-workers: install
	CONVEYOR_TEST_WORKERS=2 $(BIN)/python -m pytest -q -p no:cacheprovider \
		-n $(PYTEST_WORKERS) --dist loadscope $(WORKERS_SUITES)

test: lint typecheck unit unit-workers

# Every cluster test again, with servers of two workers (--cluster --workers 2), each
# worker a member of its own: about 4 minutes, not part of `make test`.
cluster-workers: install etcd
	CONVEYOR_TEST_WORKERS=2 $(BIN)/python -m pytest -q -p no:cacheprovider \
		-n $(PYTEST_WORKERS) --dist loadscope tests/cluster

# Long failure runs, not part of `make test`: the leader-kill loop for CONVEYOR_SOAK_S
# seconds (default 150).
soak: install etcd
	CONVEYOR_SOAK=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m soak tests/cluster

# Long fault runs, not part of `make test`: CONVEYOR_FAULTS_CYCLES power losses (default
# 30) under the engine and under the server (CONVEYOR_POWERLOSS_SEED repeats one), many
# more seeded bit flips in logs and queues than `make test` runs, and the cluster's
# counterparts of its negative controls (the same faults, durability intact).
faults: install etcd fuse
	$(BIN)/python -m pytest -q -p no:cacheprovider -m faults tests/engine tests/server tests/cluster

# Benchmarks are not part of `make test`; see docs/PERFORMANCE.md.
bench: install etcd wrk
	mkdir -p .benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider bench/ --benchmark-columns=mean,ops,rounds \
		--benchmark-sort=name --benchmark-json=.benchmarks/latest.json $(BENCH_ARGS)
	$(BIN)/python -m bench.report .benchmarks/latest.json
	$(BIN)/python -m bench.http_load $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.http_load --protection $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.http_load --large $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.http_load --workers 2 $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.cluster_load $(BENCH_CLUSTER_ARGS)

# The HTTP load generator alone: a server and a bare aiohttp baseline, driven in one run;
# then authentication and encryption on against off; then the server CPU per KiB of large
# bodies sent and received; then what 1,000 idle long polls cost.
bench-http: install wrk
	$(BIN)/python -m bench.http_load $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.http_load --protection $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.http_load --large $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.http_load --workers 2 $(BENCH_HTTP_ARGS)
	$(BIN)/python -m bench.idle_polls

# The peers bench-peers runs beside Conveyor, from Debian (installed when missing, as for
# etcd above): NATS, Redis and RabbitMQ. Debian puts two of them in /usr/sbin.
peers:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v nats-server >/dev/null \
		&& command -v redis-server >/dev/null && command -v rabbitmq-server >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
			--no-install-recommends nats-server redis-server rabbitmq-server; }

# Conveyor against NATS JetStream, Redis Streams and RabbitMQ quorum queues, each through
# its own Python client, in one run; the table of ratios, and the chart PERFORMANCE.md shows.
bench-peers: install peers
	$(BIN)/python -m bench.peers --chart docs/peers.png $(BENCH_PEERS_ARGS)

# A 3-node RF=3 cluster against one node, same settings, in one run (needs etcd).
bench-cluster: install etcd
	$(BIN)/python -m bench.cluster_load $(BENCH_CLUSTER_ARGS)

# Issue-sized cluster: 10,000 queues on three nodes, at rest, under load, through a leader
# kill (needs etcd; about 20 minutes at the defaults). SCALE_ARGS="--queues 1000 --rest-s 60"
# for a quicker look.
scale: install etcd
	$(BIN)/python -m bench.scale $(SCALE_ARGS)

# A fourth node joining a three-node cluster that holds 400 MB of queues, half of them
# churned: seconds until it is in the ISR of every queue the ring gives it, MB/s of state,
# snapshots against log copies, and a producer and consumer on moving queues throughout
# (needs etcd; about 3 minutes). JOIN_ARGS="--state-mb 100" for a quicker look.
join: install etcd
	$(BIN)/python -m bench.join $(JOIN_ARGS)

# Backlogs: memory per queued message at rest and at its peak while sending, reopen time
# and drain rate, at 10 k, 1 M and 10 M messages (about 2 minutes and 1 GiB of memory).
# BACKLOG_ARGS="--sizes 10000,1000000" for a quicker look, "--fifo [--per-group N]" for
# FIFO, "--delay S" for delayed messages, "--server" through a real `conveyor serve`.
backlog: install
	$(BIN)/python -m bench.backlog $(BACKLOG_ARGS)

# Line tracing and asserts in the Cython code (CONVEYOR_DEBUG=1).
debug-build: install
	CONVEYOR_DEBUG=1 $(BIN)/python setup.py -q build_ext --inplace --force -j 2

clean:
	rm -rf build $(VENV) engine/*.so engine/*.c .mypy_cache .ruff_cache
