#!/usr/bin/env bash
# The soak a person runs (not part of CI): 64 clients pull 200 images through berth (the binary,
# release build) while an in-process upstream cycles through hang, mid-body resets, 429, 503
# and healthy. Every body is verified; the run prints outcomes, p50/p99 latencies, berth's peak
# RSS, fill resumes and upstream failures by kind. Loopback only; bounded by SOAK_SECS.
#
#   benches/soak.sh                  # 60 s, phases of 3 s
#   SOAK_SECS=1200 benches/soak.sh   # the 20-minute soak
#   SOAK_PHASE_SECS=10 benches/soak.sh
#   SOAK_PROFILE=debug benches/soak.sh   # the debug build `cargo test` already made
#
# The test is tests/drill_soak.rs `soak_cycling_upstream` (ignored in `cargo test`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${SOAK_SECS:-60}
phase=${SOAK_PHASE_SECS:-3}
profile=${SOAK_PROFILE:-release}
case $profile in
release) build=(--release) ;;
debug) build=() ;;
*) echo "SOAK_PROFILE is release or debug" >&2; exit 2 ;;
esac
if ! [[ $secs =~ ^[0-9]+$ && $phase =~ ^[0-9]+$ ]]; then
    echo "SOAK_SECS and SOAK_PHASE_SECS are whole seconds" >&2
    exit 2
fi
# The test clamps SOAK_SECS to 10..1800; allow for the build, the final pass and the cleanup.
limit=$((secs + 3600))
echo "soak: ${secs}s, upstream phases of ${phase}s ($profile build; this command stops within ${limit}s)"
SOAK_SECS=$secs SOAK_PHASE_SECS=$phase timeout "$limit" \
    cargo test "${build[@]}" --test drill_soak -- --ignored --exact soak_cycling_upstream --nocapture
