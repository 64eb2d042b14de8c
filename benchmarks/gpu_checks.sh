#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (a lent GPU's time is short): the CUDA tests (among them
# compiled vs eager features, nvJPEG vs the exact reader's tiles), the Keras-exact vs timm Xception forward
# passes (bench_architectures), the per-job start-up with and without the fork server (bench_startup), then
# issue 17's benchmark: bench_extract with both models alone eager and compiled (cold and warm compile
# seconds), end to end with each reader (fast, exact, gpu) and 4 / 8 / 14 workers, eager and compiled.
# ONLY_EXTRACT=1 runs the tests and bench_extract only; SKIP_EXTRACT=1 leaves bench_extract out;
# STARTUP_SLIDES and STARTUP_ROUNDS size bench_startup.
# Each step is time-boxed; logs go to $1 (default gpu_logs/). The pathwsi checkout must be the
# working directory and `python3` must import pathwsi's dependencies.
#
#     bash benchmarks/gpu_checks.sh [LOG_DIR]      # TILES, BATCH, WORKERS ("4 8 14") size the benchmark
set -uo pipefail
logs=${1:-gpu_logs}
tiles=${TILES:-30720} batch=${BATCH:-256} workers=${WORKERS:-4 8 14}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$logs/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" 2>&1 | tee -a "$logs/gpu.txt"
# the benchmark slide (a few minutes of rendering) is written while the tests run
[ -z "${SKIP_EXTRACT:-}" ] && { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_reader import ensure_slide; print(ensure_slide())" >"$logs/slide.txt" 2>&1 & }
slide=${!:-}
timeout 300 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs -m cuda \
    tests/test_models.py tests/test_extract.py tests/test_stain_torch.py tests/test_finetune.py tests/test_forkserver.py \
    tests/test_compile_policy.py tests/test_gpu_decode.py 2>&1 | tee "$logs/pytest_cuda.txt"
if [ -z "${ONLY_EXTRACT:-}" ]; then
    timeout 120 python3 benchmarks/bench_architectures.py --batch 256 --batches 8 2>&1 | tee "$logs/bench_architectures.txt"
    timeout 420 python3 benchmarks/bench_startup.py --slides "${STARTUP_SLIDES:-6}" --rounds "${STARTUP_ROUNDS:-2}" --threads 4 2>&1 | tee "$logs/bench_startup.txt"
fi
[ -n "${SKIP_EXTRACT:-}" ] && exit 0
wait "$slide" || { cat "$logs/slide.txt"; exit 1; }
# shellcheck disable=SC2086  # WORKERS is a list
timeout 540 python3 benchmarks/bench_extract.py --tiles "$tiles" --batch "$batch" --workers $workers \
    --readers fast exact gpu --compile --rounds 1 --skip-memory 2>&1 | tee "$logs/bench_extract.txt"
