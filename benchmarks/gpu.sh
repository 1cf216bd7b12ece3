#!/usr/bin/env bash
# The CUDA benchmark suite at the paper's sizes, for a lent GPU machine (no network there): one call,
# at most 8 minutes with the install, writes $OUT/gpu.json (rewritten after every benchmark, so a
# run cut short keeps what ended) and $OUT/gpu.log.
#
#   bash benchmarks/gpu.sh fetch   # HERE, once: the wheels the GPU image lacks -> .whl/ (ignore it in git:
#                                  #   echo /.whl/ >> .git/info/exclude), then carry ".whl" with the run
#   bash benchmarks/gpu.sh         # THERE, in the repo root: install .whl/, run, write $OUT/gpu.json + gpu.log
#                                  #   (BENCH_ARGS="--only step_rate ..." runs a part instead; LEADER_BENCH_COMMIT
#                                  #   names the commit, as the copy there has no .git)
#
# What it measures (issue 20), in this order: precompute at the teacher's speed (precompute_rate:
# worker processes decode, pinned copies, the views rendered on the GPU, the teacher on its own
# thread); a loader worker's time per 512 px sample by stage (loader_stages); our loader against the
# official one (loader); cached against online teachers, step alone (step_rate); the input pipeline's
# overhead on the step (overhead); both whole training pipelines end to end (end_to_end); and last,
# as its compile is the part of unknown length, the student's step by batch size, eager against
# run.compile, with MFU and the loader's capacity against the fastest step (student_step).
# The shard build, the cache's bytes and the trainer's host memory do not depend on the GPU and
# are left to the CPU runs.
#
# Before spending GPU minutes, rehearse the same path on any machine (CUDA's models, tiny counts):
#   python -m benchmarks run --profile cuda-smoke --device cpu --threads 2 $(bash benchmarks/gpu.sh only)
# The GPU image already has torch, torchvision, numpy, pillow, pyyaml, typer, rich and fsspec
# (/work/.library/device/KINDS.md); leader also needs these, pinned to the versions the CPU venv runs.
set -euo pipefail

WHEELS=${WHEELS:-.whl}
PACKAGES=(timm==1.0.31 webdataset==1.0.2 braceexpand==0.1.7 zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6
          google-crc32c==1.9.0 deflate==0.9.0)
ONLY=(--only precompute_rate --only loader_stages --only loader --only step_rate --only overhead --only end_to_end
      --only student_step)

case "${1:-run}" in
    fetch)
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "${PACKAGES[@]}"
        ls -l "$WHEELS"
        exit 0 ;;
    only)
        echo "${ONLY[@]}"
        exit 0 ;;
esac

: "${OUT:?OUT must name the folder the results go to}"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS: run 'bash benchmarks/gpu.sh fetch' on a machine with a package registry first" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; nproc; } | tee "$OUT/gpu.log"
# The one test that needs a GPU: views replayed on CUDA match the CPU's. Its result goes in the log.
python3 -m pytest -q -p no:cacheprovider tests/test_views.py -k gpu_render 2>&1 | tail -3 | tee -a "$OUT/gpu.log" || true
if [[ -n "${BENCH_ARGS:-}" ]]; then read -r -a ARGS <<< "$BENCH_ARGS"; else ARGS=("${ONLY[@]}"); fi
timeout "${BENCH_TIMEOUT:-420}" python3 -m benchmarks run --device cuda --workdir /tmp/leader-bench \
    --out "$OUT/gpu.json" "${ARGS[@]}" 2>&1 | tee -a "$OUT/gpu.log"
