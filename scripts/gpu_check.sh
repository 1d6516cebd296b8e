#!/usr/bin/env bash
# The GPU checks in one call, on a machine with a CUDA device: the card, the cuda tests (tests/test_cuda.py),
# then `metabench perf` on the GPU (MAML and first-order MAML on Omniglot 5w1s and 20w1s and miniImageNet 5w1s:
# the default mode, which on a GPU is the whole meta-batch replayed as a CUDA graph, the same eagerly, and
# learn2learn on the same GPU).
#
#   bash scripts/gpu_check.sh OUT_DIR [PATH_HOLDING_learn2learn]
#
# Writes OUT_DIR/gpu.txt (card, driver, torch), tests.txt, perf.txt and perf_gpu.csv. learn2learn's rows need
# the learn2learn package on the path (the second argument is put on PYTHONPATH); without it they are skipped.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [PATH_HOLDING_learn2learn]}
mkdir -p "$out"
export PYTHONPATH="$PWD${2:+:$2}" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    nproc
} 2>&1 | tee "$out/gpu.txt"
timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rfE \
    >"$out/tests.txt" 2>&1
echo "tests exit $?"; tail -n 25 "$out/tests.txt"
timeout "${PERF_TIMEOUT:-330}" python3 -m bench.perf --device cuda --allocators glibc \
    --workloads ${WORKLOADS:-omniglot-5w1s omniglot-20w1s miniimagenet-5w1s} --methods maml fomaml \
    --impls ${IMPLS:-metabench metabench-batched-eager l2l} --repeats 5 --warmup 2 \
    --eval-episodes 32 --timeout 120 --csv "$out/perf_gpu.csv" >"$out/perf.txt" 2>&1
echo "perf exit $?"
grep -v "^|" "$out/perf.txt" | tail -n 40
