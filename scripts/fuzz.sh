#!/usr/bin/env bash
# Fuzzes the frame and envelope decoders, token verification and config
# loading with cargo-fuzz (libFuzzer), each target for SECONDS seconds.
#   scripts/fuzz.sh SECONDS [TARGET...]
# Targets (fuzz/fuzz_targets/): client_frame server_frame envelope token
# config; all of them by default. Needs the nightly toolchain; installs
# cargo-fuzz when it is missing. Builds into fuzz/target (its own workspace).
#
# Corpora live in fuzz/corpus/TARGET and are committed: each run starts from
# them, writes the seeds (`seed-*`, valid inputs made by the crates' own
# encoders) afresh, keeps what libFuzzer adds, and minimises the corpus with
# `cargo fuzz cmin` once it grows past FUZZ_CORPUS_CAP files (default 500).
#
# Prints one line per target:
#   fuzz client_frame: 123456 runs in 10 s, 0 crashes
# and, for a crash, the input (path and base64) and the panic message.
# libFuzzer's full output is in fuzz/target/fuzz-logs/TARGET.log.
# Exits 1 when a target crashed, 2 when something else failed (toolchain,
# build, a run that did not finish), 0 otherwise.
#
# Knobs (environment): FUZZ_MAX_LEN (70000: above the 64 KiB frame limit),
# FUZZ_CORPUS_CAP (500), FUZZ_SANITIZER (address; `none` runs about twice as
# fast), FUZZ_BUILD_TIMEOUT (seconds, 3600).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

ALL_TARGETS=(client_frame server_frame envelope token config)
MAX_LEN="${FUZZ_MAX_LEN:-70000}"
CORPUS_CAP="${FUZZ_CORPUS_CAP:-500}"
SANITIZER="${FUZZ_SANITIZER:-address}"
BUILD_TIMEOUT="${FUZZ_BUILD_TIMEOUT:-3600}"

usage() {
    echo "usage: scripts/fuzz.sh SECONDS [TARGET...]  (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
}
fail() {
    echo "fuzz: $*" >&2
    exit 2
}

secs="${1:-}"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || usage
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || usage
done

# The toolchain and cargo-fuzz.
if ! timeout 60 cargo +nightly --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain"
    timeout 1200 rustup toolchain install nightly --profile minimal ||
        fail "no nightly toolchain (rustup toolchain install nightly)"
fi
if ! timeout 60 cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    timeout 1800 cargo +nightly install cargo-fuzz --locked ||
        timeout 1800 cargo +nightly install cargo-fuzz ||
        fail "cannot install cargo-fuzz"
fi

echo "== building the fuzz targets (sanitizer: $SANITIZER)"
build_start=$(date +%s)
timeout -k 30 "$BUILD_TIMEOUT" cargo +nightly fuzz build --sanitizer "$SANITIZER" ||
    fail "building the fuzz targets failed (or took over ${BUILD_TIMEOUT} s)"
echo "built in $(($(date +%s) - build_start)) s"

host=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin_dir="fuzz/target/$host/release"
log_dir="fuzz/target/fuzz-logs"
mkdir -p "$log_dir"
# The config target writes a scratch file per process into TMPDIR.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Files in a corpus directory.
count_files() { find "$1" -maxdepth 1 -type f | wc -l; }

# `cargo fuzz cmin` with extra libFuzzer flags; on failure the corpus is put
# back as it was (cmin moves it aside while it merges).
cmin() {
    local t=$1 dir=fuzz/corpus/$1 backup=$scratch/corpus-$1
    shift
    rm -rf "$backup" && cp -a "$dir" "$backup" || return 1
    if timeout -k 30 $((secs * 3 + 600)) cargo +nightly fuzz cmin --sanitizer "$SANITIZER" \
        "$t" "$dir" -- -max_len="$MAX_LEN" "$@" >>"$log_dir/$t.cmin.log" 2>&1 &&
        [ "$(count_files "$dir")" -gt 0 ]; then
        rm -rf "$backup"
        return 0
    fi
    echo "   cmin failed (see $log_dir/$t.cmin.log); corpus restored"
    rm -rf "$dir" && mv "$backup" "$dir"
    return 1
}

# Minimises a corpus that grew past the cap: first keeping every coverage
# feature, then, if that is not enough, only the edges (no hit counts); if it
# is over the cap still, drops the largest inputs other than the seeds.
shrink_corpus() {
    local t=$1 dir=fuzz/corpus/$1 n
    n=$(count_files "$dir")
    [ "$n" -gt "$CORPUS_CAP" ] || return 0
    echo "   corpus of $t has $n files: minimising"
    : >"$log_dir/$t.cmin.log"
    cmin "$t"
    n=$(count_files "$dir")
    if [ "$n" -gt "$CORPUS_CAP" ]; then
        echo "   $n files keep every feature: minimising to edge coverage"
        cmin "$t" -use_counters=0
        n=$(count_files "$dir")
    fi
    if [ "$n" -gt "$CORPUS_CAP" ]; then
        find "$dir" -maxdepth 1 -type f ! -name 'seed-*' -printf '%s %p\n' |
            sort -rn | head -n $((n - CORPUS_CAP)) | cut -d' ' -f2- |
            while read -r f; do rm -f -- "$f"; done
    fi
    echo "   corpus of $t: $(count_files "$dir") files"
}

crashed=0
errors=0
summary=()
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    log=$log_dir/$t.log
    mkdir -p "$corpus" "$artifacts"
    echo "== fuzz $t for $secs s"

    # Seeds: valid inputs from the crates' encoders (the binary writes them
    # and exits when asked; the flags keep a binary that does not from
    # fuzzing, or from leaving artifacts in the work tree).
    TIERCAST_FUZZ_WRITE_SEEDS="$corpus" timeout 60 "$bin_dir/$t" \
        -runs=0 -artifact_prefix="$scratch/" >/dev/null 2>&1 ||
        echo "   could not write seeds for $t"

    before=$(mktemp)
    find "$artifacts" -maxdepth 1 -type f | sort >"$before"
    run_start=$(date +%s)
    TMPDIR="$scratch" timeout -k 30 $((secs + 600)) cargo +nightly fuzz run \
        --sanitizer "$SANITIZER" "$t" "$corpus" -- \
        -max_total_time="$secs" -max_len="$MAX_LEN" -timeout=25 -rss_limit_mb=4096 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    run_secs=$(($(date +%s) - run_start))
    new_artifacts=$(find "$artifacts" -maxdepth 1 -type f | sort | comm -13 "$before" -)
    rm -f "$before"

    runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1)
    [ -n "$runs" ] || runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' <<<"$done_line")
    took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' <<<"$done_line")
    # No `Done` line when libFuzzer stopped on a crash: the wall time then.
    [ -n "$took" ] || took=$run_secs
    [ -n "$runs" ] || runs="?"

    n_crashes=0
    [ -z "$new_artifacts" ] || n_crashes=$(wc -l <<<"$new_artifacts")
    if [ "$n_crashes" -eq 0 ] && [ "$rc" -ne 0 ] && grep -qE 'ERROR: libFuzzer|panicked at|==ERROR' "$log"; then
        n_crashes=1
    fi

    if [ "$n_crashes" -gt 0 ]; then
        crashed=1
        line="fuzz $t: $runs runs in $took s, $n_crashes crashes"
        echo "$line"
        grep -m 3 -A 2 -E 'panicked at|ERROR: libFuzzer|==ERROR' "$log" | sed 's/^/   /'
        while read -r f; do
            [ -n "$f" ] || continue
            echo "   input: $f ($(stat -c %s "$f") bytes)"
            echo "   base64: $(base64 -w0 "$f")"
            echo "   reproduce: cargo +nightly fuzz run $t $f"
        done <<<"$new_artifacts"
    elif [ "$rc" -ne 0 ]; then
        errors=1
        line="fuzz $t: $runs runs in $took s, 0 crashes, but the run failed (exit $rc, see $log)"
        echo "$line"
        tail -n 5 "$log" | sed 's/^/   /'
    else
        line="fuzz $t: $runs runs in $took s, 0 crashes"
        echo "$line"
    fi
    summary+=("$line")
    shrink_corpus "$t"
done

echo "== summary"
printf '%s\n' "${summary[@]}"
[ "$crashed" -eq 0 ] || exit 1
[ "$errors" -eq 0 ] || exit 2
exit 0
