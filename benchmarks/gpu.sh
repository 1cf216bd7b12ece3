#!/usr/bin/env bash
# The CUDA benchmark suite at the paper's sizes, for a lent GPU machine (no network there).
#
#   bash benchmarks/gpu.sh fetch   # HERE, once: the wheels the GPU image lacks -> .whl/ (ignore it in git:
#                                  #   echo /.whl/ >> .git/info/exclude), then carry ".whl" with the run
#   bash benchmarks/gpu.sh         # THERE, in the repo root: install .whl/, run, write $OUT/gpu.json + gpu.log
#                                  #   (BENCH_ARGS="--only step_rate ..." runs a part; LEADER_BENCH_COMMIT
#                                  #   names the commit, as the copy there has no .git)
#
# The GPU image already has torch, torchvision, timm, numpy, pillow, pyyaml, typer, rich and fsspec
# (/work/.library/device/KINDS.md); leader also needs webdataset and zarr v3 with their pure-Python or
# cp312 dependencies, pinned to the versions the CPU venv runs. The suite is sized (benchmarks/profiles.py,
# CUDA) to finish in about 6 minutes on one H100; the timeout leaves room for the install.
set -euo pipefail

WHEELS=${WHEELS:-.whl}
PACKAGES=(timm==1.0.31 webdataset==1.0.2 braceexpand==0.1.7 zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6 google-crc32c==1.9.0)

if [[ "${1:-run}" == "fetch" ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${PACKAGES[@]}"
    ls -l "$WHEELS"
    exit 0
fi

: "${OUT:?OUT must name the folder the results go to}"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS: run 'bash benchmarks/gpu.sh fetch' on a machine with a package registry first" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.log"
# The one test that needs a GPU: views replayed on CUDA match the CPU's. Its result goes in the log.
python3 -m pytest -q -p no:cacheprovider tests/test_views.py -k gpu_render 2>&1 | tail -3 | tee -a "$OUT/gpu.log" || true
timeout "${BENCH_TIMEOUT:-460}" python3 -m benchmarks run --device cuda --workdir /tmp/leader-bench \
    --out "$OUT/gpu.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/gpu.log"
