#!/bin/bash
# Builds the probe library: bash build.sh OUTDIR (CUTLASS from the nvidia-cutlass wheel; CUT=... to override)
set -e
OUT=${1:-/tmp/cutl/build}; mkdir -p $OUT
CUT=${CUT:-$(python3 -c "import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),'source'))")}
FLAGS="-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC -I$CUT/include -I$CUT/tools/util/include"
for c in ${CFGS:-0 1 2 3 4 5 6 7}; do
  echo "nvcc $FLAGS -DSF_CFG=$c -c $(dirname $0)/probe.cu -o $OUT/p$c.o"
done | xargs -P ${JOBS:-2} -I{} bash -c "{} 2>&1 | grep -v 'warning #' | grep -E 'error|C75' | cut -c1-300 || true"
nvcc -shared -o $OUT/libsfprobe.so $OUT/p*.o
echo built $OUT/libsfprobe.so
