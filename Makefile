# The README's two commands are `make run` and `make test`.
OPENCODE_VERSION := 1.18.33
CARGO ?= cargo
# End-to-end tests mostly wait on servers, so more of them than cores can run at once.
TEST_THREADS ?= 4

.PHONY: build release test lint run opencode clean bench

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# Installs the pinned OpenCode into ~/.cache when missing, then runs every test against it.
test: opencode
	OPENCODE_BIN="$$(bash tests/install-opencode.sh $(OPENCODE_VERSION) | tail -n 1)" \
		$(CARGO) test --all-targets -- --test-threads $(TEST_THREADS)

# Latency, throughput and memory figures of the release binary against local fakes, then one
# smaller pass against the real OpenCode; writes target/bench.json. BENCH_IDLE_SECS=10 for a quick run.
bench: opencode
	OPENCODE_BIN="$$(bash tests/install-opencode.sh $(OPENCODE_VERSION) | tail -n 1)" \
		$(CARGO) bench --bench bench

opencode:
	@bash tests/install-opencode.sh $(OPENCODE_VERSION) >/dev/null

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# Runs the bridge with the settings from the environment (or ENV_FILE=path).
run: release
	./target/release/opencode-mattermost run $(if $(ENV_FILE),--env-file $(ENV_FILE))

clean:
	$(CARGO) clean
