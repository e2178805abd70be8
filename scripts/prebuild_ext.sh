#!/usr/bin/env bash
# Build the extension modules on this (CPU) machine for the device, so that a device call with
# little time left skips the ~5 minute build: scripts/build_ext.sh unpacks .prebuilt/ when its
# stamp matches the sources. Needs a Python and a CUDA build of torch matching the device's
# (torch 2.11+cu130, Python 3.12; see benchmarks/METHOD.md) and CUTLASS's headers (CUTLASS_DIR or
# the nvidia-cutlass wheel). Builds for sm_90 only. Then carry .prebuilt (git-ignored).
#   PY=/path/to/python3.12 scripts/prebuild_ext.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
stamp=$(find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} $PY setup.py build_ext --inplace
mkdir -p .prebuilt
tar cJf .prebuilt/ext.tar.xz sparseflow/*.so
echo "$stamp" >.prebuilt/stamp
ls -l .prebuilt
