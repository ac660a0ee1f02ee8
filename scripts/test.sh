#!/usr/bin/env bash
# Runs the whole test suite from a fresh Debian/Ubuntu machine: installs what is missing (host
# packages, virtiofsd, the guest kernel), builds the guest assets and every binary, then runs
# fmt, clippy and the tests (real QEMU guests under KVM or TCG, a real local registry).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup-host.sh
[ -f scripts/setup-virtiofsd.sh ] && bash scripts/setup-virtiofsd.sh
bash scripts/build-assets.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads="${BOXLITE_TEST_THREADS:-2}"
