#!/usr/bin/env bash
# The GPU check (issue 15): one run of at most 8 minutes on one GPU that writes one JSON.
#   1. tests/test_cuda.py: training steps and every test-time family in bfloat16 on CUDA, the
#      device choice (pass/fail counts and durations);
#   2. bench_train.py and bench_eval.py on ViT-S/16 (random weights) at 128 px in bfloat16:
#      s/episode, peak memory, fraction of the measured matmul peak;
#   3. the workflow on CUDA: two short amt training runs (a pool), a selection and amt's
#      evaluation on digits (configs/ci.yaml's sizes), timed, in a scratch folder;
#   4. configs/paper.yaml's GPU-hours per stage estimated from those rates (bench/gpu_check.py).
# Nothing is downloaded: synthetic and package-shipped data, random weights.
#
#   bench/gpu_check.sh [--cpu] [OUT.json]
#
# OUT.json defaults to $OUT/gpu_check.json when $OUT is set, else bench/gpu_check.json. Without
# a GPU (or with --cpu) it runs a reduced mode on the CPU in 1-2 minutes on 2 cores (tiny_vit,
# few episodes; the CUDA tests skip) that exercises every step: CI runs it so that it cannot rot.
# A step that fails or overruns its time limit is recorded and the others still run; the exit
# status is non-zero if any failed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code

mode=gpu
why="a GPU was found"
out=""
for arg in "$@"; do
    case "$arg" in
        --cpu) mode=cpu; why="--cpu" ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) out=$arg ;;
    esac
done
if [ -z "$out" ]; then
    out=${OUT:+$OUT/gpu_check.json}
    out=${out:-bench/gpu_check.json}
fi
if [ "$mode" = gpu ] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"
then
    mode=cpu
    why="no CUDA GPU found"
fi

cores=$(nproc)
if [ "$mode" = gpu ]; then
    device=cuda
    backbone=dino_vits16  # ViT-S/16 at 128 px
    train_args=(--attack-steps 10)  # configs/paper.yaml's train.amt.attack_steps
    eval_args=(--frozen-backbones dino_vits16 --frozen-episodes 100 --workers 4)
    # seconds: 7 min 5 s in all with the 5-s grace of each (a fresh GPU process starts in ~10 s)
    limits=(tests=70 bench_train=130 bench_eval=100 workflow_config=25 workflow=100)
else
    device=cpu
    backbone=tiny_vit
    train_args=(--attack-steps 2 --episodes 1 --min-seconds 0)
    eval_args=(--members 2 --steps 2 --repeats 1 --frozen-backbones tiny_vit
               --frozen-episodes 10)
    # no limit that matters: CI machines are slow and shared; this mode checks that it runs
    limits=(tests=600 bench_train=600 bench_eval=600 workflow_config=600 workflow=600)
    # one thread per process, as the pipeline's jobs run: tiny models gain nothing from more,
    # and a contended thread pool stalls them
    export OMP_NUM_THREADS=1
fi
declare -A limit
for pair in "${limits[@]}"; do limit[${pair%=*}]=${pair#*=}; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "gpu_check: $mode mode ($why), $backbone on $device, JSON to $out" >&2

step() {  # step NAME COMMAND...: run under its time limit, stdout to $work/NAME.out,
    # stderr to $work/NAME.log; its exit status and seconds go to $work/steps.tsv
    local name=$1 start rc seconds
    shift
    echo "+ [$name] $*" >&2
    start=$EPOCHREALTIME
    timeout --kill-after=5 "${limit[$name]}" "$@" > "$work/$name.out" 2> "$work/$name.log"
    rc=$?
    seconds=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$work/$name.log" >> "$work/steps.tsv"
    echo "  [$name] exit $rc, $seconds s" >&2
    return "$rc"
}

step tests python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    --junitxml "$work/tests.xml"
step bench_train python bench/bench_train.py --json --backbones "$backbone" --shots 1 5 \
    --device "$device" "${train_args[@]}"
step bench_eval python bench/bench_eval.py --json --backbones "$backbone" --shots 1 5 \
    --device "$device" "${eval_args[@]}"
if step workflow_config python bench/gpu_check.py workflow-config --backbone "$backbone" \
    --device "$device" --folder "$work/workflow"; then
    step workflow snakemake --snakefile "$repo/Snakefile" \
        --configfile "$work/workflow/config.yaml" --directory "$work/workflow/run" \
        --cores "$cores" --resources gpu=4 -- "$(cat "$work/workflow_config.out")"
fi
python bench/gpu_check.py report --work "$work" --mode "$mode" --why="$why" \
    --backbone "$backbone" --out "$out"
