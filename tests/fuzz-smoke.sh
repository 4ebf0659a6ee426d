#!/usr/bin/env bash
# Bounded fuzz smoke run: builds the cargo-fuzz targets in fuzz/ and runs each for FUZZ_SECONDS
# (default 20) from its committed seeds in fuzz/seeds/<target>/ (and fuzz/dicts/<target>.dict
# when there is one). Fails on any crash, panic, timeout or out-of-memory. Prints the executions
# per target and closes with "fuzz: N passed, M failed".
#
#   FUZZ_SECONDS=20        seconds per target
#   FUZZ_TARGETS="a b"     only these targets (default: all, from `cargo fuzz list`)
#   FUZZ_SANITIZER=address address (default) or none (faster, finds only panics)
#
# Needs rustup's stable toolchain and a C compiler. cargo-fuzz is installed from crates.io into
# ~/.cargo/bin when missing. cargo-fuzz passes nightly flags (-Zsanitizer, ...): on stable they
# are accepted with RUSTC_BOOTSTRAP=1, set only for the fuzz build here.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR="$ROOT/fuzz"
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# Same as cargo-fuzz sets: Rust's ASan build reports false ODR violations.
export ASAN_OPTIONS="detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

log() { printf 'fuzz-smoke: %s\n' "$*" >&2; }

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    log "installing cargo-fuzz into ~/.cargo/bin"
    cargo install cargo-fuzz --locked
fi

cd "$FUZZ_DIR"
# The fuzz crate's own Cargo.lock must match berth's dependencies, as the main one must.
cargo metadata --locked --format-version 1 >/dev/null
started=$(date +%s)
log "building fuzz targets (sanitizer: $FUZZ_SANITIZER)"
# Default cargo-fuzz profile: optimized, with debug assertions and overflow checks.
cargo fuzz build --sanitizer "$FUZZ_SANITIZER"
built=$(date +%s)
log "build took $((built - started))s"

triple=$(rustc -vV | sed -n 's/^host: //p')
bindir="$FUZZ_DIR/target/$triple/release"
if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/berth-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

passed=0
failed=0
failed_names=()
for t in "${targets[@]}"; do
    bin="$bindir/$t"
    if [[ ! -x "$bin" ]]; then
        log "$t: no binary at $bin"
        failed=$((failed + 1))
        failed_names+=("$t")
        continue
    fi
    corpus="$work/$t/corpus"
    artifacts="$work/$t/artifacts"
    mkdir -p "$corpus" "$artifacts"
    if [[ -d "$FUZZ_DIR/seeds/$t" ]]; then
        cp "$FUZZ_DIR/seeds/$t"/* "$corpus"/
    fi
    dict=()
    if [[ -f "$FUZZ_DIR/dicts/$t.dict" ]]; then
        dict=(-dict="$FUZZ_DIR/dicts/$t.dict")
    fi
    out="$work/$t/log"
    rc=0
    # New inputs go to the temp corpus, never into the repository.
    "$bin" "$corpus" \
        -max_total_time="$FUZZ_SECONDS" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -print_final_stats=1 \
        "${dict[@]}" \
        -artifact_prefix="$artifacts/" \
        >"$out" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    if [[ -z "$execs" ]]; then
        execs=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$out" | tail -1)
    fi
    crash=$(find "$artifacts" -type f | head -1)
    if [[ $rc -eq 0 && -z "$crash" ]]; then
        passed=$((passed + 1))
        echo "fuzz: $t ok: ${execs:-?} executions in ${FUZZ_SECONDS}s"
    else
        failed=$((failed + 1))
        failed_names+=("$t")
        echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} executions"
        # The panic message and its stack (or libFuzzer's/ASan's report), then the input.
        if grep -q 'panicked at' "$out"; then
            sed -n '/panicked at/,/^==[0-9]*==/p' "$out" | head -50
        else
            grep -v '^#[0-9]' "$out" | tail -50
        fi | sed "s/^/  $t | /"
        if [[ -n "$crash" ]]; then
            echo "  $t | input $(basename "$crash") (base64): $(base64 -w0 "$crash")"
            if "$bin" "$crash" >/dev/null 2>&1; then
                echo "  $t | (this input does not fail when run again on its own)"
            fi
            echo "  $t | reproduce: echo <base64> | base64 -d > /tmp/in && (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t /tmp/in)"
        fi
    fi
done

log "fuzzing took $(($(date +%s) - built))s"
if [[ $failed -gt 0 ]]; then
    log "failed: ${failed_names[*]}"
fi
echo "fuzz: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
