# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNDIR := .run

.PHONY: run mint test lint typecheck unit venv clean bench bench-ops fuzz fmt soak abuse bpf \
	dist constraints image

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# A local server on 127.0.0.1 (3478 udp+tcp, 5349 tls) with loopback peers allowed, a
# generated shared secret and self-signed certificate (kept in .run/), and a
# ready-to-use credential printed at start.

run: $(STAMP)
	@mkdir -p $(RUNDIR) && chmod 700 $(RUNDIR)
	$(BIN)/turnserver dev --state-dir $(RUNDIR)

# The kernel fast path's BPF object, built reproducibly (clang and libbpf-dev) and
# shipped in the package: installed servers need no compiler, only libbpf.so.1. After
# changing the C source, `make bpf` and commit the object (a test checks they match).
BPF_OBJ := turnserver/io/kernel/channel_relay.bpf.o
bpf: $(STAMP)
	$(BIN)/python -c 'import subprocess; from pathlib import Path; \
		from turnserver.io.kernel.program import clang_command, SOURCE; \
		subprocess.run(clang_command(SOURCE, Path("$(BPF_OBJ)")), check=True)'

# A wheel and an sdist in dist/ (install without the checkout:
# pip install 'dist/turnserver-VERSION-py3-none-any.whl[testing]').
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# Pin what the image installs: the runtime dependencies, resolved in a clean venv.
constraints:
	rm -rf .run/constraints-venv
	$(PYTHON) -m venv .run/constraints-venv
	.run/constraints-venv/bin/pip install --quiet .
	{ echo "# Versions the image installs (pip install -c constraints.txt .): the runtime dependencies"; \
	  echo "# and theirs, as tested. Refresh with: make constraints"; \
	  .run/constraints-venv/bin/pip freeze --exclude turnserver; } >constraints.txt
	rm -rf .run/constraints-venv

# The container image, with podman (or docker) from the Dockerfile.
ENGINE ?= $(shell command -v podman >/dev/null && echo podman || echo docker)
image:
	$(ENGINE) build $(if $(findstring podman,$(ENGINE)),--format docker) -t turnserver .

# Another credential for the `make run` server (MINT_USER=name TTL=1h FORMAT=ice-servers)
MINT_USER ?= dev
TTL ?= 1d
FORMAT ?= rest
mint: $(STAMP)
	@$(BIN)/turnserver mint --config config/dev.yaml --secrets-file $(RUNDIR)/secret \
		--user $(MINT_USER) --ttl $(TTL) --format $(FORMAT)

lint: $(STAMP)
	$(BIN)/ruff check turnserver tests benchmarks docs/examples
	$(BIN)/ruff format --check turnserver tests benchmarks docs/examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict turnserver

# the codec, the core and pure helpers: no sockets, no processes, a few seconds
unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# every test: interop, browsers, containers, proxies, the kernel path
test: lint typecheck
	$(BIN)/pytest -q --durations=15

# The core's state machine with long random sequences (hypothesis), then coverage-guided
# fuzzing of the codec, framer and core (atheris); FUZZ_RUNS inputs.
FUZZ_RUNS ?= 3000000
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/pytest -q -p no:cacheprovider tests/unit/test_core_sequences.py
	$(BIN)/pip install --quiet atheris
	@mkdir -p $(RUNDIR)/fuzz-corpus
	cp tests/fuzz/corpus/* $(RUNDIR)/fuzz-corpus/
	PYTHONPATH=. $(BIN)/python tests/fuzz/fuzz_stun.py -runs=$(FUZZ_RUNS) -print_final_stats=1 $(RUNDIR)/fuzz-corpus

# Our server and coturn under the same load; writes benchmarks/RESULTS.md.
bench: $(STAMP)
	@command -v turnutils_peer >/dev/null || { echo "make bench needs coturn: apt-get install -y coturn"; exit 2; }
	@command -v cc >/dev/null || { echo "make bench needs a C compiler for its pacer: apt-get install -y gcc"; exit 2; }
	@test -f /usr/include/openssl/hmac.h || { echo "make bench needs OpenSSL headers for its setup generator: apt-get install -y libssl-dev"; exit 2; }
	$(BIN)/python benchmarks/run.py

# What operating it costs: /metrics scrape CPU with one worker and two (benchmarks/OPERATIONS.md)
bench-ops: $(STAMP)
	$(BIN)/python benchmarks/ops.py

# What abuse costs: CPU of the worst inputs, a good client's loss and RTT under attacks.
abuse: $(STAMP)
	$(BIN)/python benchmarks/abuse.py

# Allocation churn plus relay traffic; prints RSS and fds over time (must stay flat).

SOAK_SECONDS ?= 120
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --duration $(SOAK_SECONDS)

fmt: $(STAMP)
	$(BIN)/ruff check --fix turnserver tests benchmarks docs/examples
	$(BIN)/ruff format turnserver tests benchmarks docs/examples


clean:
	rm -rf $(VENV) $(RUNDIR) .mypy_cache .ruff_cache .pytest_cache .hypothesis
