"""benchmarks/profile_step.py: kernel names sorted into the classes its table reports (names as
CUPTI gives them on an H100), and a CPU smoke run that writes both models' profiles."""

import json

import pytest

from tests.conftest import benchmark_script


def _profile_step():
    return benchmark_script("profile_step")


OUR_CUTLASS = (
    "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int, int>, "
    "cutlass::gemm::collective::CollectiveMma<cutlass::gemm::MainloopSm90TmaGmmaWarpSpecializedSparse<4, "
    "cute::tuple<cute::C<1>>, cutlass::gemm::KernelTmaWarpSpecializedCooperative>>>>(...)"
)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (OUR_CUTLASS, "2:4 GEMM, CUTLASS"),
        ("void decode24_kernel<__half, 2, true>(uint4 const*, uint4 const*)", "2:4 GEMM, decode kernel"),
        ("void decompress_24_kernel<__half>(__half const*, unsigned char const*)", "2:4 other (decompress, pad)"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_cublas", "dense GEMM"),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN", "dense GEMM"),
        ("cutlass3x_sm90_tensorop_gemm_f16_f16_f32_f16_f16_128x128x64_1x1x1_0_tnn_align8", "dense GEMM"),
        ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64>>(...)", "attention"),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)", "attention"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "inductor fused"),
        # names from an H100 run of a compiled 2:4 Llama step: inductor fused our op's neighbours
        ("triton_poi_fused_mul_silu_slice_sparse_linear_8", "inductor fused"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_sparse_linear_14", "inductor fused"),
        (
            "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy__unsafe_view_add_arange_bmm_cat_clone",
            "attention inputs (inductor)",
        ),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1", "attention"),
        ("nvjet_sm90_hsh_64x16_64x16_2x1_v_bz_splitK_TNT", "dense GEMM"),
        ("Memcpy DtoD (Device -> Device)", "copy, fill"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>", "other"),
    ],
)
def test_kernel_names_fall_in_their_class(name, cls):
    assert _profile_step().kernel_class(name) == cls


def test_tiny_cpu_smoke_writes_both_profiles(tmp_path):
    ps = _profile_step()
    argv = ["--tiny", "--device", "cpu", "--layers", "1", "--compile-mode", "default", "--compile-backend", "aot_eager"]
    ps.main([*argv, "--context", "16", "--steps", "2", "--batch", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "profile_cpu_decode_b2.json").read_text())
    assert result["step"] == "decode_b2" and result["settings"]["steps"] == 2
    for model in ("dense", "sparse"):
        r = result[model]
        assert r["total_us"] > 0 and r["top"] and r["wall_us"] > 0
        assert sum(c["us"] for c in r["classes"].values()) == pytest.approx(r["total_us"])
        assert sum(k["us"] for k in r["kernels"]) == pytest.approx(r["total_us"])
        again = ps.reclassify(json.loads(json.dumps(r)))
        assert again["classes"].keys() == r["classes"].keys()
        for cls, c in r["classes"].items():
            assert again["classes"][cls]["us"] == pytest.approx(c["us"])


def test_reclassify_moves_kernels_to_their_class_now():
    ps = _profile_step()
    profiled = {
        "total_us": 30.0,
        "classes": {"2:4 GEMM, cuSPARSELt": {"us": 30.0, "count": 3}},
        "kernels": [
            {
                "name": "triton_poi_fused_mul_silu_slice_sparse_linear_8",
                "class": "2:4 GEMM, cuSPARSELt",
                "us": 10.0,
                "count": 1,
            },
            {"name": OUR_CUTLASS, "class": "2:4 GEMM, cuSPARSELt", "us": 20.0, "count": 2},
        ],
    }
    classes = ps.reclassify(profiled)["classes"]
    assert classes == {"inductor fused": {"us": 10.0, "count": 1}, "2:4 GEMM, CUTLASS": {"us": 20.0, "count": 2}}


def test_attn_option_reaches_the_model_and_the_file_name(tmp_path):
    ps = _profile_step()
    argv = ["--tiny", "--device", "cpu", "--layers", "1", "--compile-mode", "default", "--compile-backend", "aot_eager"]
    ps.main([*argv, "--context", "8", "--steps", "1", "--batch", "1", "--attn", "eager", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "profile_cpu_decode_b1_attn-eager.json").read_text())
    assert result["settings"]["attn"] == "eager"
