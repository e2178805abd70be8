"""Build: the CUDA extension where CUDA torch + nvcc + cuSPARSELt are present, else pure Python.

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
you run (an isolated build env would fetch a different torch).
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _note(msg: str) -> None:
    print(f"[sparseflow setup] {msg}", file=sys.stderr)


def _find_cusparselt():
    """cuSPARSELt ships with CUDA builds of torch as the nvidia-cusparselt wheel."""
    roots = [os.environ.get("CUSPARSELT_ROOT", "")] + [os.path.join(p, "nvidia", "cusparselt") for p in sys.path]
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include", "cusparseLt.h")):
            libs = sorted(glob.glob(os.path.join(root, "lib", "libcusparseLt.so*")))
            if libs:
                return root, libs[0]
    return None


def _find_cuda_home():
    """The toolkit behind ``nvcc`` (which may be a link or a wrapper script in /usr/local/bin)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime_api.h")
        ):
            return home
    return None


def _extra_cuda_includes(cuda_home):
    """torch's CUDA headers include cusparse.h/cublas_v2.h; a minimal toolkit may lack them, while
    the nvidia-* wheels that came with torch carry them."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    for p in sys.path:
        for sub in ("cu13", "cu12", "cusparse"):
            inc = os.path.join(p, "nvidia", sub, "include")
            if os.path.isfile(os.path.join(inc, "cusparse.h")):
                return [inc]
    return []


def _find_cutlass():
    """CUTLASS's C++ headers: $CUTLASS_DIR (a CUTLASS checkout) or the nvidia-cutlass wheel
    (``pip install nvidia-cutlass``, which carries them under cutlass_library/source)."""
    roots = [os.environ.get("CUTLASS_DIR", "")]
    try:
        import cutlass_library

        roots.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))
    except ImportError:
        pass
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include", "cutlass", "cutlass.h")):
            return root
    return None


def _host_opt() -> str:
    """-O3, or -O0 under SPARSEFLOW_COMPILE_CHECK=1 (CI): a build that is compiled but never run.
    nvcc's -O sets only the host code's level (device code is optimized either way); gcc at -O0
    takes a third of the time on CUTLASS's host-side templates and catches the same build breaks."""
    return "-O0" if os.environ.get("SPARSEFLOW_COMPILE_CHECK") == "1" else "-O3"


def _cutlass_extension(CUDAExtension, cuda_includes):
    """sparseflow._cutlass: CUTLASS's sm90 2:4 GEMM, compiled for sm_90a only (wgmma.sp)."""
    if os.environ.get("SPARSEFLOW_NO_CUTLASS") == "1":
        _note("SPARSEFLOW_NO_CUTLASS=1: no CUTLASS sm90 kernels")
        return []
    root = _find_cutlass()
    if root is None:
        _note("CUTLASS headers not found (pip install nvidia-cutlass, or set CUTLASS_DIR): no sm90 kernels")
        return []
    _note(f"building sparseflow._cutlass for sm_90a with CUTLASS at {root}")
    flags = [_host_opt(), "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"]
    # TMA descriptors through our once-resolved cuTensorMapEncodeTiled (csrc/cutlass/cutlass_gemm_ops.cu), not
    # a driver entry-point lookup per descriptor (host time on every call)
    flags.append("-DCUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL")
    return [
        CUDAExtension(
            name="sparseflow._cutlass",
            # one file per (dtype, configuration) under csrc/cutlass/inst/: they compile in parallel
            sources=[
                "csrc/cutlass/cutlass_module.cpp",
                "csrc/cutlass/cutlass_gemm_ops.cu",
                *sorted(glob.glob("csrc/cutlass/inst/*.cu")),
            ],
            include_dirs=[
                os.path.join(root, "include"),
                os.path.join(root, "tools", "util", "include"),
                *cuda_includes,
            ],
            extra_compile_args={"cxx": [_host_opt()], "nvcc": flags},
        )
    ]


def _extensions():
    if os.environ.get("SPARSEFLOW_NO_EXT") == "1":
        _note("SPARSEFLOW_NO_EXT=1: pure-Python install")
        return [], {}
    if "CUDA_HOME" not in os.environ:
        home = _find_cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _note("torch not importable at build time: pure-Python install (use --no-build-isolation)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _note(f"torch {torch.__version__} has no CUDA or nvcc not found: pure-Python install (CPU path)")
        return [], {}
    found = _find_cusparselt()
    if found is None:
        _note("cuSPARSELt (nvidia-cusparselt wheel) not found: pure-Python install")
        return [], {}
    root, lib = found
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if _host_opt() == "-O0":
        _note("SPARSEFLOW_COMPILE_CHECK=1: host code at -O0 (a compile check: slow host path, do not benchmark)")
    _note(f"building sparseflow._C for {os.environ['TORCH_CUDA_ARCH_LIST']} with cuSPARSELt at {root}")
    ext = CUDAExtension(
        name="sparseflow._C",
        sources=[
            "csrc/common/module.cpp",
            "csrc/common/format_kernels.cu",
            "csrc/cusparselt/cusparselt_gemm.cpp",
            "csrc/decode/decode_gemm.cu",
            "csrc/decode/decode_ops.cpp",
        ],
        include_dirs=[os.path.join(root, "include")] + _extra_cuda_includes(CUDA_HOME),
        library_dirs=[os.path.join(root, "lib")],
        libraries=[":" + os.path.basename(lib)],
        extra_link_args=[f"-Wl,-rpath,{os.path.join(root, 'lib')}"],
        extra_compile_args={
            "cxx": [_host_opt(), "-Wno-deprecated-declarations"],
            "nvcc": [_host_opt(), "--use_fast_math"],
        },
    )
    return [ext, *_cutlass_extension(CUDAExtension, _extra_cuda_includes(CUDA_HOME))], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
