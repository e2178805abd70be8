#!/usr/bin/env bash
# Build the extension in place (pip install -e .), unless this (warm) device machine already built
# the same sources: stamp = hash of csrc/ and setup.py, kept in build/.sf_stamp. REBUILD=1 forces.
# Prints one status line; the build log goes to $1 (default build.log).
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-build.log}
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp=$(find csrc setup.py -type f | sort | xargs cat | sha256sum | cut -c1-16)
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
