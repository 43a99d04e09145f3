#!/usr/bin/env bash
# First contact with a GPU machine, in one command: environment, the CUDA tests, the attention
# benchmark, a cold and a warm default-size run of train.py on the prose corpus, a profile of the
# training step, and a summary of the figures issue 12's bars are read from. Needs no internet: the
# wheels train.py's path lacks (rustbpe, for prepare.py) come from WHEELS, the corpus from CORPUS.
# Every step has its own time limit, so a hang costs that step, not the check. Steps 1-7 take ~8 minutes on
# an H100; eight files land in OUT_DIR (the device tool brings back at most eight).
#
# Step 8 trains the defaults under GPU memory caps of 48, 32 and 24 GiB (bench/fit_caps.py): the
# device batch each run was fitted to, its peak and speed (two new shapes to compile: a few minutes).
#
# Usage: bash bench/gpu_check.sh OUT_DIR            (on the GPU machine, from anywhere)
#        bash bench/gpu_check.sh OUT_DIR --dry-run  (on a CPU: tiny settings, minutes, to catch typos)
#
# Before, on a machine with the repository beside ../shared (both folders are ignored by git):
#   mkdir -p .bench && tar xJf ../shared/data/prose.tar.xz -C .bench      # -> .bench/prose/*.txt
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl rustbpe==0.1.0
set -uo pipefail

OUT=$(mkdir -p "${1:?usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]}" && cd "$1" && pwd)
DRY_RUN=$([ "${2:-}" = "--dry-run" ] && echo 1 || echo 0)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
CORPUS=${CORPUS:-$ROOT/.bench/prose}
WORK=${WORK:-${TMPDIR:-/tmp}/autoresearch-gpu-check}
COLD_BUDGET=${COLD_BUDGET:-60}   # training seconds of the cold run: steady-state speed shows after ~60 s
WARM_BUDGET=${WARM_BUDGET:-20}   # the warm run is there for its overhead (total - training seconds)
cd "$ROOT"
rm -rf "$WORK" && mkdir -p "$WORK"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
# run_step NAME LIMIT_S LOG CMD...: run with a time limit, output to LOG, one status line in the summary
run_step() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc
    shift 3
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    say "$(printf '%-10s rc=%-3s %4ss%s' "$name" "$rc" "$((SECONDS - start))" \
        "$([ $rc = 124 ] || [ $rc = 137 ] && echo "  TIMED OUT after ${limit}s")")"
}

# --- wheels and settings -------------------------------------------------------------------------
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export AUTORESEARCH_CACHE=$WORK/cache PYTHONUNBUFFERED=1
TRAIN=$ROOT/train.py
if [ "$DRY_RUN" = 1 ]; then  # tiny model and budgets; the same steps
    export AUTORESEARCH_MAX_SEQ_LEN=128 AUTORESEARCH_EVAL_TOKENS=4096
    COLD_BUDGET=5 WARM_BUDGET=3 TRAIN=$WORK/train.py
    sed -e 's/^DEPTH = 8 /DEPTH = 2 /' -e 's/^ASPECT_RATIO = 64 /ASPECT_RATIO = 32 /' \
        -e 's/^HEAD_DIM = 128 /HEAD_DIM = 32 /' -e 's/^TOTAL_BATCH_SIZE = 2\*\*19 /TOTAL_BATCH_SIZE = 2**10 /' \
        -e 's/^DEVICE_BATCH_SIZE = 128 /DEVICE_BATCH_SIZE = 4 /' "$ROOT/train.py" > "$TRAIN"
    [ "$(diff "$ROOT/train.py" "$TRAIN" | grep -c '^<')" = 5 ] || { echo "dry run: train.py's defaults moved"; exit 1; }
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # train.py may run from $WORK (dry run)

# --- 1. environment ------------------------------------------------------------------------------
{
    date -u; uname -a; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import importlib.util, torch
triton = importlib.util.find_spec("triton") and __import__("triton").__version__
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, triton {triton}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
EOF
    "$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|tiktoken|rustbpe|pyarrow|pytest) '
} > "$OUT/env.txt" 2>&1
say "env: $(grep -m1 '^torch ' "$OUT/env.txt")"

# --- 2. the prose corpus (CPU, seconds) -----------------------------------------------------------
if [ ! -d "$CORPUS" ] && [ -f "$ROOT/../shared/data/prose.tar.xz" ]; then
    mkdir -p "$(dirname "$CORPUS")" && tar xJf "$ROOT/../shared/data/prose.tar.xz" -C "$(dirname "$CORPUS")"
fi
run_step prepare 120 "$OUT/prepare.log" "$PYTHON" prepare.py --data "$CORPUS"

# --- 3. cold run (empty compile cache), 4. warm run (the same code: compile cache hit) ------------
# First, because the bars are read off them; the summary is written as soon as they end.
rm -rf "$AUTORESEARCH_CACHE/torchinductor"
AUTORESEARCH_TIME_BUDGET=$COLD_BUDGET run_step cold $((COLD_BUDGET + 240)) "$OUT/cold.log" "$PYTHON" "$TRAIN"
AUTORESEARCH_TIME_BUDGET=$WARM_BUDGET run_step warm $((WARM_BUDGET + 120)) "$OUT/warm.log" "$PYTHON" "$TRAIN"
# the bars, read off the two runs
"$PYTHON" - "$OUT/cold.log" "$OUT/warm.log" <<'EOF' | tee -a "$SUMMARY"
import re, sys
for path in sys.argv[1:]:
    log = open(path, errors="replace").read()
    block = dict(re.findall(r"^(\w+):\s+(\S+)$", log.split("\n---\n")[-1], flags=re.M)) if "\n---\n" in log else {}
    steps = re.findall(r"step (\d{5}) .*?dt: (\d+)ms", log)
    estimate = re.search(r"^fit: .*?estimated peak ([\d.]+) GiB", log, flags=re.M)
    if not block:
        print(f"{path}: no summary block; last lines:\n" + "\n".join(log.replace("\r", "\n").splitlines()[-15:]))
        continue
    f = {k: float(v) for k, v in block.items() if re.fullmatch(r"[-\d.]+", v)}
    print(f"{path.rsplit('/', 1)[-1]}: val_bpb {f['val_bpb']:.6f}, tokens_per_sec {f['tokens_per_sec']:,.0f}, "
          f"mfu {f['mfu_percent']:.2f}%, steps {f['num_steps']:.0f}, training {f['training_seconds']:.1f}s, "
          f"total {f['total_seconds']:.1f}s, overhead {f['total_seconds'] - f['training_seconds']:.1f}s")
    if "startup_seconds" in f:
        parts = [f["startup_seconds"], f["warmup_seconds"], f["eval_seconds"]]
        print(f"  overhead = start-up {parts[0]:.1f}s + steps 0-10 {parts[1]:.1f}s + eval {parts[2]:.1f}s + rest "
              f"{f['total_seconds'] - f['training_seconds'] - sum(parts):.1f}s")
    if steps:
        print(f"  step 0 (compile) {int(steps[0][1]) / 1000:.1f}s, median dt of steps 11+ "
              f"{sorted(int(dt) for s, dt in steps[11:])[len(steps[11:]) // 2] if steps[11:] else 0} ms")
    if estimate:
        est = float(estimate.group(1)) * 1024
        peak = f["peak_vram_mb"]
        print(f"  peak_vram_mb {peak:,.0f}, start-up estimate {est:,.0f} ({100 * (est - peak) / max(peak, 1):+.1f}%)")
EOF
# --- 5. the CUDA tests, 6. attention candidates for the S and L layers ------------------------------
run_step tests 180 "$OUT/tests.log" "$PYTHON" -m pytest -q -k "cuda or attention" tests/test_train.py tests/test_fit.py
run_step attention 120 "$OUT/attention.txt" "$PYTHON" bench/bench_attention.py

# --- 7. where the step's time goes (needs CUDA) ---------------------------------------------------
if [ "$DRY_RUN" = 0 ]; then
    run_step profile 120 "$OUT/profile.txt" "$PYTHON" bench/profile_step.py 3
fi

# --- 8. the defaults as on 48, 32 and 24 GiB GPUs (memory caps): the fit, the peak, the speed -----
# (into the summary: the device tool brings back at most eight files)
FITS_BUDGET=${FITS_BUDGET:-15}
AUTORESEARCH_TIME_BUDGET=$([ "$DRY_RUN" = 1 ] && echo 2 || echo "$FITS_BUDGET") \
    AUTORESEARCH_EVAL_TOKENS=$([ "$DRY_RUN" = 1 ] && echo 4096 || echo $((64 * 2048))) TRAIN_PY=$TRAIN \
    run_step fits 600 "$WORK/fits.txt" "$PYTHON" bench/fit_caps.py
cat "$WORK/fits.txt" >> "$SUMMARY"
echo "files in $OUT:" && ls -la "$OUT"
