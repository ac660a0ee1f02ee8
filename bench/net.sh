#!/usr/bin/env bash
# Network benchmark of the usernet, libslirp and passt backends in one run: TCP throughput both
# ways (iperf3 in a TCG guest against a peer in a network namespace), HTTP connect + request +
# response latency through a port forward (p50/p99), UDP round trips. Prints a markdown table.
#
# Needs root, qemu-system-x86_64, busybox-static, iperf3, passt, python3, iproute2, and the guest
# kernel (fetched here if missing). Numbers are TCG numbers: the guest CPU is the bottleneck.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/fetch-kernel.sh >/dev/null
cargo test --release -p boxlite --test net_bench -- --ignored --nocapture --test-threads=1 2>&1 |
  grep -E '^\||^BENCH' | grep -v '^BENCH'
