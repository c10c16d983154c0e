"""``benchmarks/train_step.py --profile``: the kernel categories, the breakdown of a trace, and the smoke run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
KERNELS = ROOT / "packages" / "rcm-kernels" / "src" / "rcm_kernels"


@pytest.fixture
def common(monkeypatch):
    """``benchmarks/_common.py`` and ``train_step.py`` as the scripts import them (their folder on the path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _common
    import train_step

    return _common, train_step


# (name as the profiler records it, launched in a JVP pass, category)
NAMES = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", False, "gemm"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT", False, "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>"
     "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)", False, "gemm"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn", False, "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, false, false, "
     "false>(cublasLt::cublasSplitKParams<float>, float const*)", False, "gemm"),
    ("triton_tem_fused_mm_0", False, "gemm"),
    ("_jvp_attn_fwd", False, "attention fwd"),
    ("_jvp_attn_fwd", True, "JVP attention"),
    ("_jvp_attn_fwd_ws", True, "JVP attention"),
    ("_cache_attn_fwd", False, "attention fwd"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", False,
     "attention fwd"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, "
     "false, true, true, false>(pytorch_flash::Flash_fwd_params)", False, "attention fwd"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)", False, "attention fwd"),
    ("_bwd_dkdv", False, "attention bwd"),
    ("_bwd_dq", False, "attention bwd"),
    ("_bwd_delta", False, "attention bwd"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_20_64x128x128_4x1x1_kernel0_0", False,
     "attention bwd"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128, 8, "
     "2, 4, 2, false, false, cutlass::bfloat16_t>, false, false, false, false, false, false>"
     "(pytorch_flash::Flash_bwd_params)", False, "attention bwd"),
    ("fmha_cutlassB_bf16_aligned_128x64_k128_sm80", False, "attention bwd"),
    ("_ln_mod_fwd", True, "fused norm/mod/rope"),
    ("_rms_rope_bwd", False, "fused norm/mod/rope"),
    ("_gated_fwd", False, "fused norm/mod/rope"),
    ("_gelu_bwd", False, "fused norm/mod/rope"),
    ("triton_poi_fused__to_copy_add_mul_0", False, "elementwise / other Triton"),
    ("triton_red_fused_native_layer_norm_1", False, "elementwise / other Triton"),
    ("triton_per_fused_sum_2", True, "elementwise / other Triton"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
     "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)", False,
     "elementwise / other Triton"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
     "at::native::sum_functor<float, float, float>::operator()>, unsigned int, float, 4, 4> >", False,
     "elementwise / other Triton"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", False, "communication"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", False, "communication"),
    ("Memcpy HtoD (Pageable -> Device)", False, "memcpy/memset"),
    ("Memset (Device)", False, "memcpy/memset"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType"
     "<2u>, unsigned int, 1, 128, 1>(...)", False, "other"),
]


@pytest.mark.parametrize("name,jvp,category", NAMES, ids=[f"{n[:24]}-{j}" for n, j, _ in NAMES])
def test_kernel_category(common, name, jvp, category):
    assert common[0].kernel_category(name, jvp=jvp) == category


def _launched(path: Path) -> set[str]:
    """The Triton kernels a source file launches (``kernel[grid](...)``)."""
    return set(re.findall(r"^\s*(_\w+)\[", path.read_text(), flags=re.M))


def test_kernel_names_follow_the_sources(common):
    """Every Triton kernel ``rcm_kernels.fused`` and the attention modules launch is named in ``_common``'s
    lists (a renamed or new kernel would otherwise fall to ``other``)."""
    c = common[0]
    fused = set().union(*(_launched(p) for p in (KERNELS / "fused").glob("*.py")))
    attn = _launched(KERNELS / "attention" / "triton_jvp.py") | _launched(KERNELS / "attention" / "cache_attention.py")
    assert {"_ln_mod_fwd", "_rms_rope_fwd", "_gated_fwd", "_gelu_fwd"} <= fused
    assert all(k.startswith(c.FUSED_KERNELS) for k in fused), sorted(fused)
    assert attn == set(c.ATTN_FWD_KERNELS) | set(c.ATTN_BWD_KERNELS), sorted(attn)


def _x(name, tid, ts, dur, cat="user_annotation", corr=None):
    e = dict(ph="X", cat=cat, name=name, pid=1, tid=tid, ts=ts, dur=dur)
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_trace_breakdown_device(common):
    """CUDA-like trace: each kernel goes to the innermost stage around its launch on the launching thread
    (main or autograd), ``_jvp_attn_fwd`` under a JVP pass is JVP attention; expected sums by hand (exact)."""
    c, ts = common
    host = [_x("rcm: iteration", 7, 3_000, 90_000, "gpu_user_annotation"),  # the GPU row's copy: not the root
            _x("rcm: iteration", 1, 0, 100_000), _x("rcm: teacher forward (no grad)", 1, 10_000, 20_000),
            _x("rcm: student forward_jvp", 1, 30_000, 20_000), _x("aten::mm", 1, 31_000, 2_000, "cpu_op"),
            _x("Optimizer.step#AdamW.step", 1, 90_000, 5_000),
            _x("autograd::engine::evaluate_function: MmBackward0", 2, 60_000, 20_000, "cpu_op"),
            _x("rcm: recompute (SAC)", 2, 62_000, 8_000)]
    launches = [(1, 12_000, "nvjet_tst_256x128", 4_000, 1), (1, 20_000, "_jvp_attn_fwd", 2_000, 2),
                (1, 32_000, "_jvp_attn_fwd", 3_000, 3), (2, 65_000, "triton_poi_fused_add_0", 1_000, 4),
                (2, 75_000, "_bwd_dq", 5_000, 5), (1, 92_000, "Memset (Device)", 500, 6),
                (1, 5_000, "ncclDevKernel_AllGather_RING_LL", 2_000, 7)]
    gpu_ts = {1: 10_000, 2: 20_000, 3: 41_000, 4: 60_000, 5: 70_000, 6: 95_000, 7: 40_000}  # 3 and 7 overlap
    events = host + [_x("cudaLaunchKernel" if tid == 1 else "cuLaunchKernelEx", tid, t, 10,
                        "cuda_runtime" if tid == 1 else "cuda_driver", corr) for tid, t, _, _, corr in launches]
    events += [_x(name, 7, gpu_ts[corr], dur, "gpu_memset" if name.startswith("Memset") else "kernel", corr)
               for _, _, name, dur, corr in launches]
    b = c.trace_breakdown({"traceEvents": events}, ts.stage_of, "rcm: iteration")
    assert b["basis"] == "device kernel time" and b["wall_ms"] == 100.0
    stages = {"teacher forward (no grad)": 6.0, "backward": 5.0, "student forward_jvp": 3.0, "other": 2.0,
              "recompute (SAC)": 1.0, "optimizer": 0.5}
    assert {r["stage"]: r["ms"] for r in b["stages"]} == stages
    cats = {"attention bwd": 5.0, "gemm": 4.0, "JVP attention": 3.0, "attention fwd": 2.0, "communication": 2.0,
            "elementwise / other Triton": 1.0, "memcpy/memset": 0.5}
    assert {r["category"]: r["ms"] for r in b["categories"]} == cats
    assert [r["pct"] for r in b["categories"]][:2] == pytest.approx([100 * 5 / 17.5, 100 * 4 / 17.5])
    assert b["stage_categories"]["teacher forward (no grad)"] == {"gemm": 4.0, "attention fwd": 2.0}
    assert b["device_busy_ms"] == pytest.approx(17.5 - 1.0)  # kernels 3 [41, 44] and 7 [40, 42] overlap by 1 ms


def test_trace_breakdown_host(common):
    """CPU trace: the root's wall time split by the innermost stage range on its thread (non-stage operators
    transparent, other threads ignored); the stages sum to the root's duration."""
    c, ts = common
    events = [_x("rcm: iteration", 1, 0, 100_000), _x("rcm: student forward", 1, 10_000, 30_000),
              _x("rcm: teacher forward (no grad)", 1, 20_000, 10_000), _x("aten::mm", 1, 12_000, 6_000, "cpu_op"),
              _x("autograd::engine::evaluate_function: AddBackward0", 1, 50_000, 20_000, "cpu_op"),
              _x("rcm: recompute (SAC)", 1, 55_000, 5_000), _x("Optimizer.zero_grad#AdamW.zero_grad", 1, 99_000, 3_000),
              _x("rcm: fake_score forward", 2, 0, 100_000)]
    b = c.trace_breakdown({"traceEvents": events}, ts.stage_of, "rcm: iteration")
    assert b["basis"] == "host wall time" and b["categories"] == [] and b["device_busy_ms"] is None
    expected = {"other": 49.0, "student forward": 20.0, "backward": 15.0, "teacher forward (no grad)": 10.0,
                "recompute (SAC)": 5.0, "optimizer": 1.0}
    assert [r["stage"] for r in b["stages"]] == list(expected)  # by decreasing time
    assert {r["stage"]: r["ms"] for r in b["stages"]} == pytest.approx(expected, abs=1e-9)
    assert sum(r["pct"] for r in b["stages"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no host range named 'nope'"):
        c.trace_breakdown({"traceEvents": events}, ts.stage_of, "nope")


@pytest.mark.slow  # ~12 s: the tiny networks built and stepped once per phase, then profiled
def test_train_step_smoke_profile(tmp_path):
    """``train_step.py --smoke --sac attention --profile DIR`` (a selective SAC mode: the recompute range must
    not disturb its replay of the saved ops) writes both traces and a breakdown whose stages sum to the
    profiled iteration's wall clock (measured around it with perf_counter; tolerance 5% + 2 ms for the
    profiler's own work outside the root range) and name every stage the iteration has."""
    out, prof = tmp_path / "ts.json", tmp_path / "prof"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--smoke", "--sac", "attention", "--json", str(out),
                           "--profile", str(prof)], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["phase"]: r for r in json.loads(out.read_text())["rows"]}
    want = {"student": {"teacher forward (no grad)", "student forward_jvp", "student forward",
                        "fake_score forward (no grad)", "backward", "recompute (SAC)", "optimizer"},
            "critic": {"student forward (no grad)", "fake_score forward", "backward", "recompute (SAC)",
                       "optimizer"}}
    for phase, stages in want.items():
        p = rows[phase]["profile"]
        assert p["trace"] == str(prof / f"{phase}.json")
        names = {e.get("name") for e in json.loads((prof / f"{phase}.json").read_text())["traceEvents"]}
        assert "rcm: iteration" in names and "rcm: recompute (SAC)" in names
        ms = {r["stage"]: r["ms"] for r in p["stages"]}
        assert stages <= set(ms) <= stages | {"other"}, ms
        assert all(ms[s] > 0 for s in stages)
        total = sum(ms.values())
        assert abs(total - p["measured_ms"]) <= 0.05 * p["measured_ms"] + 2.0, (total, p["measured_ms"])
        assert f"{phase} iteration, attention, 2 frames: host wall time by stage" in proc.stdout
