#!/usr/bin/env bash
# Runs every test of berth on a fresh Debian 12 machine (as root): installs the programs the
# tests need, checks formatting and lints, runs the Rust tests (unit, in-process integration,
# and end to end with real dockerd/containerd/podman/skopeo/docker-registry), the Helm chart
# tests and the fuzz smoke runs. This is the command the README gives and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/setup.sh
command -v cargo >/dev/null || { echo "run.sh: cargo is required" >&2; exit 1; }

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets --quiet -- -D warnings

echo "== cargo test"
mkdir -p target
# Written by tests/e2e_docker.rs (berth's /metrics after real pulls) and tests/cluster.rs (a
# clustered replica's with an object store); checked by the chart tests.
metrics_dump=target/metrics-e2e.txt
cluster_metrics_dump=target/metrics-cluster.txt
rm -f "$metrics_dump" "$cluster_metrics_dump"
cargo test --locked 2>&1 | tee target/cargo-test.log

echo "== chart tests"
cargo build --quiet
[[ -s $metrics_dump ]] || { echo "run.sh: $metrics_dump is missing: tests/e2e_docker.rs did not write it" >&2; exit 1; }
[[ -s $cluster_metrics_dump ]] || { echo "run.sh: $cluster_metrics_dump is missing: tests/cluster.rs did not write it" >&2; exit 1; }
BERTH_BIN=target/debug/berth BERTH_METRICS_FILE=$metrics_dump BERTH_CLUSTER_METRICS_FILE=$cluster_metrics_dump \
    tests/chart.sh 2>&1 | tee target/chart-test.log

echo "== fuzz smoke runs"
tests/fuzz-smoke.sh 2>&1 | tee target/fuzz-test.log

# One closing line over every suite (each suite above already failed the run on a failure).
python3 - <<'PY'
import re
passed = failed = 0
for log in ("target/cargo-test.log", "target/chart-test.log", "target/fuzz-test.log"):
    try:
        text = open(log).read()
    except FileNotFoundError:
        continue
    for m in re.finditer(r"(\d+) passed[;,] (\d+) failed", text):
        passed += int(m.group(1)); failed += int(m.group(2))
print(f"all: {passed} passed, {failed} failed")
PY
