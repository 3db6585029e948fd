#!/usr/bin/env bash
# unet-edge's CUDA paths in one go, on a machine lent for a few minutes: install this tree (no network, no
# dependencies fetched), print the GPU, driver, torch and CUDA versions, then within a time budget run the GPU
# tests, CUDA training (AMP) to the demo's val mIoU, a training-throughput sweep over batch sizes, export,
# verify (TorchScript on CUDA, ONNX on the CPU) and bench (PyTorch variants x precisions, 256² and 512²).
#
#   OUT=/empty/folder bash benchmarks/gpu_check.sh               # on a CUDA machine, from the repository root
#   OUT=/empty/folder bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps on the CPU with tiny sizes
#
# Writes under $OUT (default benchmarks/out/gpu-check): gpu_check.log (everything printed), gpu_check.json and
# gpu_check.md (versions, each step's status and seconds, training, verify and bench figures, images/s against
# eager fp32), train_metrics.jsonl, and bench_<size>.json and bench_<size>_compile.json (the full bench reports). A failing step does not stop the later steps that do
# not need it; the script exits 1 when any step failed, and a step that cannot run says why it was skipped.
#
# Environment: PYTHON (.venv/bin/python where `make install` made it, else python3), BUDGET_S (480; 300 with --cpu-smoke), TRAIN_EPOCHS (20, as `make demo`),
# MIN_MIOU (0.95), BENCH_VARIANTS, BENCH_DTYPES, BENCH_SECONDS.
set -euo pipefail
export LC_ALL=C

SMOKE=0
for arg in "$@"; do
    case $arg in
        --cpu-smoke) SMOKE=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $arg (use --cpu-smoke or --help)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/out/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/gpu_check.{log,json,md} "$OUT"/train_metrics.jsonl "$OUT"/bench_*.json

if ((SMOKE)); then
    MODE=cpu-smoke DEVICE=cpu BUDGET_S=${BUDGET_S:-300} MIN_MIOU=${MIN_MIOU:-}
    TRAIN_ARGS=(--epochs 2 --batch-size 8 --image-size 32 --base-channels 4 --depth 2)
    SWEEP_ARGS=(--sweep 4,8 --images 8 --image-size 32 --base-channels 4 --depth 2 --rounds 1)
    BENCH_SIZES=(48) BENCH_BATCHES=1,2 BENCH_PROVIDERS=cpu # one size: the loop over sizes is the GPU run's
    BENCH_VARIANTS=${BENCH_VARIANTS:-eager,channels-last,cudagraphs} BENCH_DTYPES=${BENCH_DTYPES:-fp32,bf16}
    BENCH_TIMING=(--warmup 1 --iters 2)
    BENCH_FILES=(model.onnx) # TorchScript's rows are the checkpoint's code path again (tests/test_bench.py runs them)
    EXPORT_ARGS=(--precision fp32) # verify and bench read model.onnx and model.ts only
    SKIP_COMPILE="--cpu-smoke: torch.compile takes about a minute per shape on a small CPU (tests/test_cuda_paths.py runs it)"
else
    MODE=gpu DEVICE=cuda BUDGET_S=${BUDGET_S:-480} MIN_MIOU=${MIN_MIOU:-0.95}
    TRAIN_ARGS=(--epochs "${TRAIN_EPOCHS:-20}")
    SWEEP_ARGS=(--sweep 16,32,64,128 --images 1024 --image-size 128 --rounds 2)
    BENCH_SIZES=(256 512) BENCH_BATCHES=1,8,32 BENCH_PROVIDERS=cuda,tensorrt
    BENCH_VARIANTS=${BENCH_VARIANTS:-eager,channels-last,cudagraphs} BENCH_DTYPES=${BENCH_DTYPES:-fp32,bf16,fp16}
    BENCH_TIMING=(--warmup 3 --seconds "${BENCH_SECONDS:-0.5}")
    BENCH_FILES=(model.onnx model.ts)
    EXPORT_ARGS=()
    SKIP_COMPILE=
fi

main() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/unet-edge-gpu-check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    export XDG_CACHE_HOME=$WORK/cache TORCHINDUCTOR_CACHE_DIR=$WORK/inductor UNET_EDGE_PROGRESS=0 PYTHONUNBUFFERED=1
    PY=${PYTHON:-python3}
    if [[ -z ${PYTHON:-} && -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python; fi
    DEADLINE=$(($(date +%s) + BUDGET_S))
    FAILED=0
    declare -gA STATUS=()
    : >"$WORK/steps.tsv"
    echo "unet-edge GPU check ($MODE) of $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'an unversioned tree'), $(date -u '+%F %T') UTC, budget ${BUDGET_S} s"
    cd "$REPO"

    local run=$WORK/runs/check export_dir=$WORK/exported/check size
    run_step install 120 "" install_project
    run_step versions 60 install "$PY" benchmarks/gpu_check_report.py versions "$WORK/versions.json" $( ((SMOKE)) || echo --require-cuda)
    run_step gpu-tests 150 versions "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
    if ((SMOKE)); then
        run_step data 60 versions "${UE[@]}" data synth --out "$WORK/tiny" --num-train 16 --num-val 4 --size 32
        run_step train 120 data "${UE[@]}" train --device "$DEVICE" --data "$WORK/tiny" "${TRAIN_ARGS[@]}" --out "$WORK/runs" --name check
    else
        run_step train 180 versions "${UE[@]}" train --device "$DEVICE" "${TRAIN_ARGS[@]}" --out "$WORK/runs" --name check
    fi
    run_step train-check 30 train "$PY" benchmarks/gpu_check_report.py train-check "$run/metrics.jsonl" \
        ${MIN_MIOU:+--min-miou "$MIN_MIOU"} --save "$WORK/train_check.txt"
    run_step train-sweep 90 versions "$PY" benchmarks/train_throughput.py "${SWEEP_ARGS[@]}" --device "$DEVICE" --readme "$WORK/sweep.md"
    export_formats
    if ((SMOKE)); then
        skip verify-cuda "CUDA step: --cpu-smoke verifies TorchScript on the CPU instead"
        run_step verify-cpu 60 export "${UE[@]}" verify "$export_dir/model.ts" "$export_dir/model.onnx" --provider cpu \
            --num-images 4 --runs "$WORK/runs" --json "$WORK/verify_cpu.json"
    else
        run_step verify-cuda 60 export "${UE[@]}" verify "$export_dir/model.ts" --provider cuda --runs "$WORK/runs" --json "$WORK/verify_cuda.json"
        run_step verify-cpu 60 export "${UE[@]}" verify "$export_dir/model.onnx" --provider cpu --runs "$WORK/runs" --json "$WORK/verify_cpu.json"
    fi
    # torch.compile rows get steps of their own, last: compiling once per shape and dtype is the slowest part,
    # and a step cut short by the budget then loses no other figures.
    for size in "${BENCH_SIZES[@]}"; do
        bench_step "bench-$size" 120 "$size" "$BENCH_VARIANTS"
    done
    for size in "${BENCH_SIZES[@]}"; do
        if [[ -n $SKIP_COMPILE ]]; then skip "bench-$size-compile" "$SKIP_COMPILE"; else bench_step "bench-$size-compile" 150 "$size" compile; fi
    done

    [[ -f $run/metrics.jsonl ]] && cp "$run/metrics.jsonl" "$OUT/train_metrics.jsonl"
    DEADLINE=$(($(date +%s) + 60)) # the summary runs even when the budget is spent
    run_step summary 60 "" "$PY" benchmarks/gpu_check_report.py summary "$WORK" "$OUT" --mode "$MODE"
    echo
    column -t -s $'\t' "$WORK/steps.tsv" 2>/dev/null || cat "$WORK/steps.tsv"
    if ((FAILED)); then
        echo "gpu check ($MODE): FAILED (see the steps above and $OUT/gpu_check.log)"
        return 1
    fi
    echo "gpu check ($MODE): all steps passed; results in $OUT"
}

# `export --format all` where every registered format's runtime is installed; elsewhere (the GPU machine has
# no OpenVINO or ncnn) each format that can be written, into the same folder, and the others skipped with why.
# --cpu-smoke exports the two formats that verify and bench use, one step each (the test suite exports every
# format; converting the other four took most of the smoke's time).
export_formats() {
    local name reason all=1 ok=1
    local -a formats=()
    if ((SMOKE)); then
        formats=($'onnx\t' $'torchscript\t') all=0
    else
        mapfile -t formats < <("$PY" -c 'from unet_edge.formats import FORMATS, Provider
for name, fmt in FORMATS.items(): print(name, fmt.unavailable(Provider.CPU) or str(), sep="\t")' 2>/dev/null || true)
    fi
    for name in "${formats[@]}"; do [[ -z ${name#*$'\t'} ]] || all=0; done
    if ((all)); then
        run_step export 120 train "${UE[@]}" export "$run/best.pt" --format all --out "$WORK/exported" --name check --parity-images 4
        return 0
    fi
    for name in "${formats[@]}"; do
        reason=${name#*$'\t'} name=${name%%$'\t'*}
        if [[ -n $reason ]]; then
            skip "export-$name" "$reason"
            continue
        fi
        run_step "export-$name" 90 train "${UE[@]}" export "$run/best.pt" --format "$name" "${EXPORT_ARGS[@]}" --out "$WORK/exported" --name check --parity-images 4
        [[ ${STATUS[export-$name]} == ok ]] || ok=0
    done
    STATUS[export]=$( ((ok)) && [[ -f $WORK/exported/check/model.onnx && -f $WORK/exported/check/model.ts ]] && echo ok || echo failed)
}

# bench_step NAME CAP_S SIZE VARIANTS: `unet-edge bench` of the checkpoint and BENCH_FILES at SIZE², JSON to OUT/NAME.json.
bench_step() {
    run_step "$1" "$2" export "${UE[@]}" bench "${BENCH_FILES[@]/#/$export_dir/}" --checkpoint "$run/best.pt" \
        --providers "$BENCH_PROVIDERS" --batch-sizes "$BENCH_BATCHES" \
        --image-size "$3" --torch-variants "$4" --dtypes "$BENCH_DTYPES" "${BENCH_TIMING[@]}" --json "$OUT/${1//-/_}.json"
}

# Record one step's outcome in steps.tsv (name, ok/failed/skipped, seconds, why).
record() {
    printf '%s\t%s\t%.1f\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/steps.tsv"
    echo ">>> $1: $2${4:+ ($4)}"
    if [[ $2 == failed ]]; then FAILED=1; fi
}

skip() {
    STATUS[$1]=skipped
    record "$1" skipped 0 "$2"
}

# run_step NAME CAP_S NEEDS COMMAND...: run COMMAND (a shell function, or a program under `timeout`) within
# CAP_S and the remaining budget, unless a step named in NEEDS (comma-separated) did not pass.
run_step() {
    local name=$1 cap=$2 needs=$3 need rc=0 started limit left
    shift 3
    for need in ${needs//,/ }; do
        if [[ ${STATUS[$need]:-} != ok ]]; then
            skip "$name" "needs step $need, which ${STATUS[$need]:-did not run}"
            return 0
        fi
    done
    left=$((DEADLINE - $(date +%s)))
    if ((left < 10)); then
        skip "$name" "the ${BUDGET_S} s budget is spent"
        return 0
    fi
    limit=$((cap < left ? cap : left))
    echo
    echo "=== $name (limit ${limit} s): $*"
    started=$EPOCHREALTIME
    if declare -F "$1" >/dev/null; then
        "$@" || rc=$?
    else
        timeout -k 10 "$limit" "$@" || rc=$?
    fi
    local seconds
    seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')
    case $rc in
        0) STATUS[$name]=ok; record "$name" ok "$seconds" "" ;;
        124 | 137) STATUS[$name]=failed; record "$name" failed "$seconds" "timed out after ${limit} s" ;;
        *) STATUS[$name]=failed; record "$name" failed "$seconds" "exit code $rc" ;;
    esac
}

# Make `unet_edge` and `unet_edge_cli` importable from this tree without touching the network: already so for
# $PY, or an editable install into a venv that sees the machine's packages, or else PYTHONPATH. Sets PY and UE.
install_project() {
    local here
    here=$("$PY" -c 'import pathlib, unet_edge; print(pathlib.Path(unet_edge.__file__).resolve().parent.parent)' 2>/dev/null || true)
    if [[ $here == "$REPO" ]] && "$PY" -c 'import unet_edge_cli.main' 2>/dev/null; then
        echo "$PY already imports unet_edge from $REPO: nothing to install"
    elif "$PY" -m venv --system-site-packages "$WORK/venv" &&
        "$WORK/venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO"; then
        PY=$WORK/venv/bin/python
        echo "installed $REPO (editable, no dependencies) into $WORK/venv over the system packages"
    else
        echo "editable install failed: importing from $REPO through PYTHONPATH instead"
        mkdir -p "$WORK/pythonpath"
        ln -sfn "$REPO/unet_edge" "$WORK/pythonpath/unet_edge"
        ln -sfn "$REPO/cli" "$WORK/pythonpath/unet_edge_cli"
        export PYTHONPATH=$WORK/pythonpath${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [[ -x $(dirname "$PY")/unet-edge ]]; then
        UE=("$(dirname "$PY")/unet-edge")
    else
        UE=("$PY" -m unet_edge_cli.main)
    fi
    "${UE[@]}" --help >/dev/null || return 1
    echo "unet-edge runs as: ${UE[*]}"
}

main 2>&1 | tee "$OUT/gpu_check.log"
