# The two commands: `make run` (the default experiment) and `make test`.
# Both install what they need first (scripts/setup.sh, once per user).
SHELL := /bin/bash
CARGO ?= cargo
ARGS ?=

.PHONY: setup run test bench fmt clippy clean-cache

setup:
	@bash scripts/setup.sh
	@bash scripts/link-cache.sh

run: setup
	$(CARGO) run --release --bin medzero -- run $(ARGS)

test: setup
	$(CARGO) test --workspace --release $(ARGS)

bench: setup
	$(CARGO) run --release --bin medzero -- bench $(ARGS)

fmt:
	$(CARGO) fmt --all

clippy: setup
	$(CARGO) clippy --workspace --all-targets -- -D warnings
