#!/usr/bin/env bash
# Build the extension in place (pip install -e .), unless this (warm) device machine already built
# the same sources: stamp = hash of csrc/ and setup.py, kept in build/.sf_stamp. REBUILD=1 forces.
# Prints one status line; the build log goes to $1 (default build.log).
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-build.log}
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp=$(find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
# A build made elsewhere for these sources (scripts/prebuild_ext.sh: the extension modules, built
# on a CPU machine against the device's torch, carried as .prebuilt/): unpacked instead of built.
if [ "${REBUILD:-0}" != 1 ] && [ -f .prebuilt/stamp ] && [ "$(cat .prebuilt/stamp)" = "$stamp" ]; then
  tar xJf .prebuilt/ext.tar.xz && $PY -c "import sparseflow._C" 2>"$log" \
    && { echo "build: prebuilt modules unpacked ($stamp)"; exit 0; }
  echo "build: the prebuilt modules do not import (see $log); building" >&2
fi
if [ "${REBUILD:-0}" != 1 ] && [ -f build/.sf_stamp ] && [ "$(cat build/.sf_stamp)" = "$stamp" ] \
    && $PY -c "import sparseflow._C" 2>/dev/null; then
  echo "build: skipped (sources unchanged since this machine's last build)"
  exit 0
fi
MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . >"$log" 2>&1
rc=$?
echo "build: rc=$rc in $(( $(date +%s) - t0 ))s"
if [ $rc -ne 0 ]; then tail -40 "$log" >&2; else mkdir -p build && echo "$stamp" >build/.sf_stamp; fi
exit $rc
