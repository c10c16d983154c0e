"""The fused DiT kernels compile for Hopper (sm_90) and move activations in 16-byte vectors, checked offline.

No GPU needed: triton's own compiler (and the ptxas it ships) builds each kernel variant the DiT launches in
bf16 at C = 1536, with the alignment facts the JIT derives at launch (16-byte aligned pointers, sizes and strides
divisible by 16). The PTX must hold 16-byte vector global loads and stores and no scalar 2-byte global access: a
memory-bound kernel without vector access runs at a fraction of HBM bandwidth (this check caught the per-pair
cos/sin gather of the RoPE kernel before it reached a GPU). The compile runs in a subprocess without
``TRITON_INTERPRET`` (the interpreter replaces the kernels in this process). Slow: ~1 s per variant, 13 variants.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _compile(fn, types: dict, consts: dict, warps: int = 8) -> str:
    """PTX of ``fn`` for sm_90; pointers and integer sizes/strides of ``types`` are declared 16-divisible."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in types.items()
             if n not in consts and (t.startswith("*") or t == "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=warps, enable_fp_fusion=False)
    return compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]


def _check(name: str, ptx: str) -> str | None:
    ops = set(re.findall(r"(?:ld|st)\.global[.a-z0-9]*", ptx))
    if "ld.global.v4.b32" not in ops or "st.global.v4.b32" not in ops or {"ld.global.b16", "st.global.b16"} & ops:
        return f"{name}: global access {sorted(ops)}"
    return None


def _variants():
    import triton.language as tl

    from rcm_kernels.fused.gated_residual import _gated_fwd
    from rcm_kernels.fused.gelu import _gelu_fwd
    from rcm_kernels.fused.modulate_norm import _ln_mod_fwd
    from rcm_kernels.fused.rms_norm import _rms_rope_fwd

    ln = dict(X="*bf16", TX="*bf16", W="*bf16", BIAS="*bf16", SH="*fp32", TSH="*fp32", SC="*fp32", TSC="*fp32",
              IDX="*i64", Y="*bf16", TY="*bf16", L="i32", C="i32", eps="fp32",
              **{k: "i32" for k in "s_shb s_sht s_tshb s_tsht s_scb s_sct s_tscb s_tsct".split()})
    for tan in (False, True):
        for per_frame in (False, True):
            c = dict(ISL=tl.float32, MDT=tl.float32, HAS_TX=tan, HAS_W=False, HAS_B=False, HAS_MOD=True,
                     HAS_TSH=tan, HAS_TSC=tan, HAS_IDX=per_frame, HAS_TY=tan, BLOCK_C=2048, W=None, BIAS=None)
            c.update({} if tan else dict(TX=None, TSH=None, TSC=None, TY=None))
            c.update({} if per_frame else dict(IDX=None))
            yield f"layer_norm_modulate tangent={tan} per_frame={per_frame}", _ln_mod_fwd, ln, c, 8
    gated = dict(X="*bf16", TX="*bf16", Yb="*bf16", TYb="*bf16", G="*fp32", TG="*fp32", IDX="*i64", OUT="*bf16",
                 TOUT="*bf16", L="i32", C="i32", s_gb="i32", s_gt="i32", s_tgb="i32", s_tgt="i32")
    for cdt, has_g in ((tl.bfloat16, True), (tl.float32, True), (tl.float32, False)):
        c = dict(CDT=cdt, WIDE=tl.float32, HAS_TX=True, HAS_TYB=True, HAS_G=has_g, HAS_TG=has_g, HAS_IDX=False,
                 HAS_T=True, BLOCK_C=2048, IDX=None)
        c.update({} if has_g else dict(G=None, TG=None))
        yield f"gated_residual compute={cdt} gate={has_g}", _gated_fwd, gated, c, 8
    rms = dict(X="*bf16", TX="*bf16", W="*bf16", COS="*fp32", SIN="*fp32", Y="*bf16", TY="*bf16", L="i32", C="i32",
               s_cos="i32", s_sin="i32", eps="fp32")
    for norm, rope in ((True, True), (True, False), (False, True)):
        c = dict(HALF_D=64, ISL=tl.float32, RDT=tl.float32, NORM=norm, ROPE=rope, HAS_TX=True, BLOCK_P=1024)
        c.update({} if norm else dict(W=None))
        c.update({} if rope else dict(COS=None, SIN=None))
        yield f"rms_norm_rope norm={norm} rope={rope}", _rms_rope_fwd, rms, c, 4
    for tan in (False, True):
        c = dict(ISL=tl.float32, HAS_TX=tan, BLOCK=2048)
        c.update({} if tan else dict(TX=None, TY=None))
        yield f"gelu_tanh tangent={tan}", _gelu_fwd, dict(X="*bf16", TX="*bf16", Y="*bf16", TY="*bf16", N="i32"), c, 8


def report(variants, all_good: str) -> int:
    """Compile each ``(name, kernel, types, constexprs, warps)`` of ``variants``; print the problems (or
    ``all_good``); exit status 1 if any."""
    problems = [p for name, fn, types, consts, warps in variants
                if (p := _check(name, _compile(fn, types, consts, warps)))]
    print("\n".join(problems) or all_good)
    return 1 if problems else 0


def compiles_in_subprocess(script: str) -> None:
    """Run ``script`` (a test file whose ``__main__`` calls :func:`report`) without the interpreter."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="no NVIDIA triton backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_vector_access():
    compiles_in_subprocess(__file__)


if __name__ == "__main__":
    sys.exit(report(_variants(), "all variants vectorized"))
