#!/usr/bin/env bash
# The GPU checks in one call, on a machine with a CUDA device: the card, the cuda tests (tests/test_cuda.py),
# then `metabench perf` on the GPU (MAML and first-order MAML on Omniglot 5w1s and 20w1s and miniImageNet 5w1s:
# the default mode, which on a GPU is the whole meta-batch replayed as a CUDA graph, the same eagerly, and
# learn2learn on the same GPU).
#
#   bash scripts/gpu_check.sh OUT_DIR [PATH_HOLDING_learn2learn]
#   PART=rest bash scripts/gpu_check.sh OUT_DIR [PATH_HOLDING_learn2learn]
#
# Writes OUT_DIR/gpu.txt (card, driver, torch), tests.txt, perf_gpu.txt and perf_gpu.csv. learn2learn's rows need
# the learn2learn package on the path (the second argument is put on PYTHONPATH); without it they are skipped.
# PART=rest runs, instead of the tests and that table, what the first calls left unmeasured, each part under its
# own timeout so that one slow part leaves the others' rows (about 8 minutes in all): ResNet-12 on miniImageNet
# (perf_resnet12.csv), the main workloads with TF32 off (perf_notf32.csv), and every registered method against
# its plain per-task loop on Omniglot 5w1s (perf_all.csv), each with its .txt report.
set -uo pipefail
out=${1:?usage: [PART=rest] bash scripts/gpu_check.sh OUT_DIR [PATH_HOLDING_learn2learn]}
mkdir -p "$out"
export PYTHONPATH="$PWD${2:+:$2}" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    nproc
} 2>&1 | tee "$out/gpu.txt"

perf_call() {  # perf_call NAME SECONDS ARGS...: one `metabench perf` call on the GPU into $out/perf_NAME.{csv,txt}
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 -m bench.perf --device cuda --allocators glibc --csv "$out/perf_$name.csv" "$@" \
        >"$out/perf_$name.txt" 2>&1
    echo "perf $name exit $?"
    grep -v "^|" "$out/perf_$name.txt" | tail -n 40
}

if [ "${PART:-main}" = rest ]; then
    perf_call resnet12 150 --workloads miniimagenet-5w1s-resnet12 --methods maml fomaml \
        --impls metabench metabench-batched-eager l2l --repeats 3 --warmup 1 --eval-episodes 16 --timeout 100
    perf_call notf32 100 --no-tf32 --workloads omniglot-5w1s miniimagenet-5w1s --methods maml fomaml \
        --impls metabench l2l --repeats 5 --warmup 2 --eval-episodes 32 --timeout 60
    perf_call all 230 --methods all --repeats 2 --warmup 1 --eval-episodes 8 --timeout 60
    exit 0
fi
timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rfE \
    >"$out/tests.txt" 2>&1
echo "tests exit $?"; tail -n 25 "$out/tests.txt"
perf_call gpu "${PERF_TIMEOUT:-330}" --workloads ${WORKLOADS:-omniglot-5w1s omniglot-20w1s miniimagenet-5w1s} \
    --methods maml fomaml --impls ${IMPLS:-metabench metabench-batched-eager l2l} --repeats 5 --warmup 2 \
    --eval-episodes 32 --timeout 120
