"""Regional torch.compile (``ParallelConfig.compile``): compiled blocks give eager's outputs, gradients and
JVP tangents, alone and inside the SAC wrappers, with unchanged state-dict keys. Backend ``aot_eager`` on
CPU (the same graphs Inductor would get, run by eager kernels; fast to build)."""

import copy

import pytest
import torch
from _train_tiny import tiny_dit

from rcm_train.parallel import ParallelConfig, apply_compile, parallelize

# aot_eager decomposes some ops (layer norm, GELU) into primitives: float32 results differ from eager by
# rounding only. Measured on these nets: outputs <= 1e-6, gradients <= 4e-6 absolute.
TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(model):
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}


@pytest.mark.slow  # ~15 s: the first Dynamo/AOT trace of the block on 2 shared cores
@pytest.mark.parametrize("sac", ["none", "block_wise", "attention"])
def test_compiled_blocks_match_eager(sac):
    eager = tiny_dit(depth=2)
    compiled = copy.deepcopy(eager)
    parallelize(compiled, None, ParallelConfig(sac=sac, compile=True, compile_backend="aot_eager"))
    assert all(getattr(b, "_compiled_call_impl", None) is not None or
               getattr(b._checkpoint_wrapped_module, "_compiled_call_impl", None) is not None for b in compiled.blocks)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 6, 4, generator=g), torch.rand(2, generator=g)
    y_ref, y = eager(x, t), compiled(x, t)
    torch.testing.assert_close(y, y_ref, **TOL)
    (y_ref ** 2).sum().backward()
    (y ** 2).sum().backward()
    ref, got = _grads(eager), _grads(compiled)
    assert list(got) == list(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
    # the sCM tangent pass: torch.func.jvp through the compiled blocks, no grad
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    with torch.no_grad():
        a = torch.func.jvp(lambda u, v: eager(u, v), (x, t), (tx, tt))
        b = torch.func.jvp(lambda u, v: compiled(u, v), (x, t), (tx, tt))
    torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("device, backend", [pytest.param("cpu", "aot_eager", marks=pytest.mark.slow),
                                             pytest.param("cuda", "inductor", marks=pytest.mark.gpu)])
def test_compiled_wan_blocks_forward_jvp(device, backend):
    """The real tiny WanDiT (student precision), compiled blocks under the ``attention`` SAC policy: output,
    ``forward_jvp`` (explicit tangents through the same blocks) equal eager, and the parameter gradients are
    as close to the float64 gradient as eager's. On CUDA with Inductor, the fused norm kernels and the Triton
    attention included."""
    if device == "cuda":  # TF32 convolutions (cuDNN's default) would round the two paths' inputs differently
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            _compiled_wan_blocks_forward_jvp(device, backend)
    else:
        _compiled_wan_blocks_forward_jvp(device, backend)


def _compiled_wan_blocks_forward_jvp(device, backend):
    from rcm_nets.wan import WanDiT, get_config

    torch.manual_seed(0)
    eager = WanDiT(get_config("tiny", precision="student"), dtype=torch.float32).to(device)
    eager.init_weights()
    with torch.no_grad():
        eager.head.head.weight.normal_(std=0.1)
    compiled = copy.deepcopy(eager)
    exact = copy.deepcopy(eager).to("cpu", torch.float64)  # the truth both float32 paths are judged against
    parallelize(compiled, None, ParallelConfig(sac="attention", compile=True, compile_backend=backend))
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
    t = torch.rand(1, generator=g) * 1000
    y64 = exact(x.double(), t.double(), ctx.double())
    x, ctx, t = x.to(device), ctx.to(device), t.to(device)
    y_ref, y = eager(x, t, ctx), compiled(x, t, ctx)
    torch.testing.assert_close(y, y_ref, **TOL)
    y64.square().sum().backward()
    y_ref.square().sum().backward()
    y.square().sum().backward()
    ref, got, truth = _grads(eager), _grads(compiled), _grads(exact)
    for name in ref:
        _assert_as_close_to_truth(got[name], ref[name], truth[name], name)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    with torch.no_grad():
        a, b = eager.forward_jvp(x, t, ctx, tx, tt), compiled.forward_jvp(x, t, ctx, tx, tt)
    torch.testing.assert_close(b, a, **TOL)


def _assert_as_close_to_truth(got, ref, truth, name):
    """The compiled gradient is as accurate as eager's: both are float32 roundings of the float64 gradient
    ``truth``, and Inductor's fused kernels (other reduction orders) may round differently from eager's, so
    comparing the two float32 results directly would test rounding, not correctness. Bound: compiled's
    largest error <= 4x eager's + 1e-6 of the gradient's scale (a wrong gradient is off by far more)."""
    truth = truth.to(got)
    scale = truth.abs().max().item()
    err_got, err_ref = (got - truth).abs().max().item(), (ref - truth).abs().max().item()
    assert err_got <= 4 * err_ref + 1e-6 * scale, (
        f"{name}: compiled gradient error {err_got:.3g} vs eager's {err_ref:.3g} (scale {scale:.3g}, float64 truth)")


def test_compile_bad_arguments():
    with pytest.raises(ValueError, match="nn.ModuleList"):
        apply_compile(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="compile_backend"):
        ParallelConfig(compile=True, compile_backend="cudagraphs")


@pytest.mark.slow  # ~1 min: builds and steps the three tiny networks twice (eager, then compiled)
def test_train_step_benchmark_smoke_compare(tmp_path):
    """``benchmarks/train_step.py --smoke --compare``: old path and the new one in one process, ratios written."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ts.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "train_step.py"), "--smoke", "--compare",
                           "--sac", "attention", "--compile", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    cases = {(r["sac"], r["compile"], r["phase"]) for r in result["rows"]}
    assert cases == {(s, c, p) for s, c in (("block_wise", False), ("attention", True)) for p in ("student", "critic")}
    assert all(r["ms"] > 0 for r in result["rows"])
    ratios = result["ratios"]
    assert [(q["phase"], q["new"], q["old"]) for q in ratios] == [("student", "attention+compile", "block_wise"),
                                                                  ("critic", "attention+compile", "block_wise")]
    for q in ratios:
        assert q["s_per_it"] == pytest.approx(
            next(r["ms"] for r in result["rows"] if r["compile"] and r["phase"] == q["phase"])
            / next(r["ms"] for r in result["rows"] if not r["compile"] and r["phase"] == q["phase"]))
    assert "new / old" in proc.stdout
