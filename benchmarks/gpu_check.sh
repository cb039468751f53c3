#!/usr/bin/env bash
# One command for a GPU machine: the CUDA- and Triton-marked tests of the suite, then the kernel and sliced-OT benchmarks.
#
#   benchmarks/gpu_check.sh OUTDIR            # run it (needs a CUDA device)
#   benchmarks/gpu_check.sh --dry-run OUTDIR  # check the environment and print the plan; no GPU needed
#
# Needs: python with torch (CUDA build), triton, pytest, hypothesis, numpy, scipy. POT, TRL and torchsort
# are optional: their cases are skipped, and the log says so. No package registry and no install are
# needed: the package is imported from this checkout (PYTHONPATH). Interpreter: $PYTHON, else
# .venv/bin/python when it exists, else python3.
#
# Steps: the kernels the tests and benchmark launch are compiled first, in parallel processes
# (benchmarks/warm_kernels.py fills Triton's cache), then the tests, the kernel benchmark and the
# sliced-OT benchmark. Writes to OUTDIR: gpu_check.log (everything printed), tests.xml (JUnit),
# kernels.csv, kernels_cuda.png, kernels.md (the Markdown table), sliced.csv, sliced.md. Budget:
# compilation ${GPU_CHECK_WARM_SECONDS:-95} s, tests ${GPU_CHECK_TEST_SECONDS:-205} s, kernel benchmark
# ${GPU_CHECK_BENCH_SECONDS:-110} s, sliced benchmark ${GPU_CHECK_SLICED_SECONDS:-40} s (each stopped at its
# limit; the CSVs keep every finished case), under 8 minutes in all; GPU_CHECK_JOBS (default 12) processes
# compile. Exit status: 0 when every test passed and both benchmarks finished, 1 when a test failed or the
# tests or a benchmark failed or timed out (compiling ahead only saves time: its status is logged), 2 for a
# usage error, 3 when no CUDA device is visible, 4 when a required package is missing.
set -uo pipefail

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
}

DRY_RUN=0
OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [ -n "$OUTDIR" ]; then
                echo "gpu_check.sh: one OUTDIR expected, got '$OUTDIR' and '$arg'" >&2; usage >&2; exit 2
            fi
            OUTDIR="$arg" ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    echo "gpu_check.sh: OUTDIR is missing" >&2; usage >&2; exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
log() { echo "$@" | tee -a "$LOG"; }

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's otloss, installed or not
unset TRITON_INTERPRET  # the real kernels, not the CPU interpreter
cd "$ROOT" || exit 2

log "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), python $PYTHON"

# required and optional packages, each imported (an import that fails counts as missing)
"$PYTHON" - "$LOG" <<'PY'
import importlib, sys
log = open(sys.argv[1], "a")
def say(msg):
    print(msg); log.write(msg + "\n")
missing = []
for mod in ("torch", "triton", "pytest", "hypothesis", "numpy", "scipy"):
    try:
        m = importlib.import_module(mod)
        say(f"  required {mod:11s} {getattr(m, '__version__', '?')}")
    except Exception as e:
        missing.append(mod)
        say(f"  required {mod:11s} MISSING ({type(e).__name__}: {e})")
optional = {"ot": ("POT", "pot"), "trl": ("TRL", "trl"), "torchsort": ("torchsort", "soft")}
for mod, (name, extra) in optional.items():
    try:
        m = importlib.import_module(mod)
        say(f"  optional {name:11s} {getattr(m, '__version__', '?')}")
    except Exception:
        say(f"  optional {name:11s} missing: its test cases and benchmark rows are skipped "
            f"(pip install 'torch-otloss[{extra}]' to include them)")
if missing:
    say(f"gpu_check: required package(s) missing: {', '.join(missing)}")
    sys.exit(4)
PY
status=$?
if [ "$status" -ne 0 ]; then exit "$status"; fi

"$PYTHON" -c "import otloss, pathlib, sys; p = pathlib.Path(otloss.__file__).resolve().parent; \
print(f'  otloss from {p}'); sys.exit(0 if p == pathlib.Path('$ROOT/otloss').resolve() else 1)" | tee -a "$LOG"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    log "gpu_check: an installed otloss shadows this checkout's; uninstall it or run from its own checkout"
    exit 2
fi

DEVICE="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>>"$LOG")"

# the GPU run is a marker expression over the suite: every test file that carries one of the markers
MARKERS="requires_cuda or requires_triton"
mapfile -t FILES < <(grep -l -E "requires_cuda|requires_triton" tests/test_*.py | sort)
WARM_CMD=(timeout "${GPU_CHECK_WARM_SECONDS:-95}" "$PYTHON" benchmarks/warm_kernels.py --jobs "${GPU_CHECK_JOBS:-12}")
TEST_CMD=(timeout "${GPU_CHECK_TEST_SECONDS:-205}" "$PYTHON" -m pytest -m "$MARKERS" -p no:cacheprovider -q -rs
          --junitxml "$OUTDIR/tests.xml" "${FILES[@]}")
BENCH_CMD=(timeout "${GPU_CHECK_BENCH_SECONDS:-110}" "$PYTHON" benchmarks/bench_kernels.py --device cuda
           --methods otloss_triton otloss_torch minimal trl_eager eager pot --min-run-time 0.1
           --out "$OUTDIR/kernels.csv")
SLICED_CMD=(timeout "${GPU_CHECK_SLICED_SECONDS:-40}" "$PYTHON" benchmarks/bench_sliced.py --device cuda
            --rounds 7 --block-ms 15 --out "$OUTDIR/sliced.csv")
log "  compile:   ${WARM_CMD[*]}"
log "  tests:     ${TEST_CMD[*]}"
log "  benchmark: ${BENCH_CMD[*]}"
log "  sliced:    ${SLICED_CMD[*]}"

if [ -z "$DEVICE" ]; then
    if [ "$DRY_RUN" -eq 1 ]; then
        log "gpu_check: dry run: no CUDA device here; on a GPU machine the four commands above run"
        exit 0
    fi
    log "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False): nothing run"
    exit 3
fi
log "  device    $DEVICE"
if [ "$DRY_RUN" -eq 1 ]; then
    log "gpu_check: dry run: nothing run"
    exit 0
fi

start=$SECONDS
"${WARM_CMD[@]}" 2>&1 | tee -a "$LOG"
warm_status=${PIPESTATUS[0]}
# compiling ahead only saves the later steps time: whatever it did not finish, they compile themselves
[ "$warm_status" -eq 124 ] && log "gpu_check: compiling ahead reached its time limit; the tests compile the rest"
log "gpu_check: compiling ahead finished with status $warm_status after $((SECONDS - start)) s"

"${TEST_CMD[@]}" 2>&1 | tee -a "$LOG"
tests_status=${PIPESTATUS[0]}
[ "$tests_status" -eq 124 ] && log "gpu_check: the tests reached their time limit"
log "gpu_check: tests finished with status $tests_status after $((SECONDS - start)) s"

"${BENCH_CMD[@]}" 2>&1 | tee -a "$LOG"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -eq 124 ] && log "gpu_check: the benchmark reached its time limit; the CSV holds the cases it finished"
if [ -s "$OUTDIR/kernels.csv" ]; then
    "$PYTHON" benchmarks/plot_kernels.py "$OUTDIR/kernels.csv" --out "$OUTDIR/kernels_cuda.png" 2>&1 | tee -a "$LOG"
    "$PYTHON" benchmarks/summarize_kernels.py "$OUTDIR/kernels.csv" > "$OUTDIR/kernels.md" 2>>"$LOG"
    cat "$OUTDIR/kernels.md" >> "$LOG"
fi

"${SLICED_CMD[@]}" 2>&1 | tee -a "$LOG"
sliced_status=${PIPESTATUS[0]}
[ "$sliced_status" -eq 124 ] && log "gpu_check: the sliced benchmark reached its time limit; the CSV holds the cases it finished"
if [ -s "$OUTDIR/sliced.csv" ]; then
    "$PYTHON" benchmarks/bench_sliced.py --summarize --out "$OUTDIR/sliced.csv" > "$OUTDIR/sliced.md" 2>>"$LOG"
    cat "$OUTDIR/sliced.md" >> "$LOG"
fi
log "gpu_check: done in $((SECONDS - start)) s; results in $OUTDIR"
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ] || [ "$sliced_status" -ne 0 ]; then exit 1; fi
exit 0
