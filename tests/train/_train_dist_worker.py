"""One rank of the 2-process gloo job shared by the distributed tests (tests/train/conftest.py starts it).

Usage: python _train_dist_worker.py RANK WORLD INIT_FILE OUT_DIR. Runs every check below in one process group
(start-up dominates the cost) and writes ``OUT_DIR/rank{RANK}.json``: ``{check: {"ok", "err", "detail"}}``.
Each check compares against a single-process reference computed in the same rank without communication.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from _train_tiny import tiny_dit  # noqa: E402  (the script's folder is sys.path[0])

from rcm_kernels.attention import jvp_attention  # noqa: E402
from rcm_train.parallel import (  # noqa: E402
    ParallelConfig,
    UlyssesAttention,
    UlyssesSequenceShard,
    broadcast_from_leader,
    build_mesh,
    mesh_from_process_groups,
    parallelize,
)
from rcm_train.trainer import OptimizerConfig, build_optimizer  # noqa: E402

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def maxerr(a, b) -> float:
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    return (a.detach().double() - b.detach().double()).abs().max().item()


def rel_err(a, b) -> float:
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    return maxerr(a, b) / max(b.detach().double().abs().max().item(), 1e-30)


def _batch(dtype, b=4, L=7):
    g = torch.Generator().manual_seed(123)
    return torch.randn(b, L, 4, generator=g, dtype=dtype), torch.rand(b, generator=g, dtype=dtype)


def _dp_parity(shape, dtype, cfg, *, steps=1):
    """FSDP/HSDP model on its data-parallel slice vs one process on the whole batch (mean loss): loss, grads
    and parameters after AdamW steps. Returns the worst relative errors."""
    mesh = build_mesh(*shape)
    ref, model = tiny_dit().to(dtype), tiny_dit().to(dtype)
    parallelize(model, mesh, cfg)
    x, t = _batch(dtype)
    xs, ts = x.chunk(mesh.dp_size)[mesh.dp_rank], t.chunk(mesh.dp_size)[mesh.dp_rank]
    oc = OptimizerConfig(lr=1e-2, warmup_steps=0, betas=(0.0, 0.999))
    opt_ref, opt = build_optimizer(ref, oc), build_optimizer(model, oc)
    err = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for _ in range(steps):
        loss_ref = (ref(x, t) ** 2).mean()
        loss = (model(xs, ts) ** 2).mean()
        loss_ref.backward()
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        err["loss"] = max(err["loss"], rel_err(mean_loss / dist.get_world_size() * mesh.cp_size, loss_ref))
        err["grad"] = max(err["grad"], max(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())))
        opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    err["param"] = max(rel_err(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert all(p.dtype == torch.float32 or dtype != torch.float32 for p in model.parameters())
    return err, mesh, model


# fp32 sharded vs unsharded: the reduce-scatter sums the two half-batch gradients in another order than one
# backward over the whole batch, so agreement is at fp32 rounding (measured ~1e-7 relative).
FP32_RTOL = 1e-5


@check
def fsdp_parity():
    err, mesh, model = _dp_parity((1, 2, 1), torch.float32, ParallelConfig(param_dtype=None, not_fsdp_units=[]))
    units = sum(hasattr(m, "set_requires_gradient_sync") for m in model.modules())
    worst = max(err["loss"], err["grad"])  # fp32 AdamW parameters: see fsdp_adamw_float64
    ok = worst < FP32_RTOL and mesh.fsdp.ndim == 1 and units == 2 + 3 + 1
    return ok, worst, f"{err}, fsdp units {units} (2 blocks + patch/time embeddings + head + root)"


@check
def hsdp_parity():
    err, mesh, _ = _dp_parity((2, 1, 1), torch.float32, ParallelConfig(param_dtype=None))
    worst = max(err["loss"], err["grad"])
    ok = worst < FP32_RTOL and mesh.fsdp.ndim == 2 and mesh.dp_size == 2
    return ok, worst, f"{err}, fsdp mesh {mesh.fsdp}"


@check
def fsdp_adamw_float64():
    """Two AdamW steps on sharded (DTensor) parameters: same parameters as one process. In float64, because
    with beta1 = 0 Adam's first step is ~lr * sign(g): fp32 rounding noise on gradients that are ~0 flips
    signs and moves parameters by ~lr (measured 4e-3 relative at lr 1e-2), which says nothing about FSDP.
    Even in float64, entries with |g| below Adam's eps move by lr * dg / eps: 1e-17 gradient noise gives
    ~1e-11, hence the 1e-9 parameter tolerance (gradients: 1e-12)."""
    err, _, _ = _dp_parity((1, 2, 1), torch.float64, ParallelConfig(param_dtype=None, reduce_dtype=None), steps=2)
    return max(err["loss"], err["grad"]) < 1e-12 and err["param"] < 1e-9, max(err.values()), str(err)


@check
def fsdp_sac_parity():
    # activation checkpointing inside FSDP units recomputes with the gathered parameters: same numbers
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    cfg = ParallelConfig(param_dtype=None, reduce_dtype=None, sac="mm_only")
    err, _, model = _dp_parity((1, 2, 1), torch.float64, cfg)
    wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    ok = max(err["loss"], err["grad"]) < 1e-12 and err["param"] < 1e-9 and wrapped == 2
    return ok, max(err.values()), f"{err}, wrapped {wrapped}"


@check
def fsdp_bf16_master_weights():
    """param_dtype=bf16: compute in bf16, stored parameters and optimizer state stay fp32 master weights."""
    mesh = build_mesh(1, 2, 1)
    ref, model = tiny_dit(), tiny_dit()
    parallelize(model, mesh, ParallelConfig(param_dtype="bfloat16"))
    x, t = _batch(torch.float32)
    out, out_ref = model(x, t), ref(x, t)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, warmup_steps=0))
    out.float().square().mean().backward()
    opt.step()
    dtypes = {str(p.dtype) for p in model.parameters()} | {str(v.dtype) for s in opt.state.values()
                                                         for v in s.values() if v.dim() > 0}
    e = rel_err(out.float(), out_ref)
    # bf16 has an 8-bit mantissa: a few roundings through two blocks give ~1e-2 relative error
    return e < 5e-2 and dtypes == {"torch.float32"} and out.dtype == torch.bfloat16, e, f"dtypes {dtypes}"


@check
def mesh_shapes():
    got = {}
    for shape in ((1, 2, 1), (2, 1, 1), (1, 1, 2)):
        m = build_mesh(*shape)
        got[str(shape)] = (m.shape, m.fsdp.ndim, m.dp_size, m.dp_rank, m.cp_size, m.cp_rank, m.world.mesh.tolist())
    r = dist.get_rank()
    expect = {"(1, 2, 1)": ((1, 2, 1), 1, 2, r, 1, 0, [[[0], [1]]]),
              "(2, 1, 1)": ((2, 1, 1), 2, 2, r, 1, 0, [[[0]], [[1]]]),
              "(1, 1, 2)": ((1, 1, 2), 1, 1, 0, 2, r, [[[0, 1]]])}
    try:
        build_mesh(3, 1, 1)
        bad = "no error"
    except ValueError as e:
        bad = str(e)
    # from existing groups: the world as the shard group, or as the CP group
    g1 = mesh_from_process_groups(dist.group.WORLD)
    g2 = mesh_from_process_groups(None, dist.group.WORLD)
    same = g1.world.mesh.tolist() == [[[0], [1]]] and g2.world.mesh.tolist() == [[[0, 1]]] and g2.cp_size == 2
    ok = got == {k: tuple(v) for k, v in expect.items()} and "does not match the world size 2" in bad and same
    return ok, 0.0, f"{got} | {bad} | from groups {g1.shape} {g2.shape}"


@check
def broadcast_randomness():
    mesh = build_mesh(1, 1, 2)
    noise = torch.full((3,), float(dist.get_rank() + 1))
    broadcast_from_leader([noise], mesh.cp_group)
    return bool((noise == 1.0).all()), 0.0, f"{noise.tolist()}"


def _ulysses_attention(L, heads, mask):
    mesh = build_mesh(1, 1, 2)
    shard = UlyssesSequenceShard(mesh.cp_group)
    from rcm_kernels.attention import Attention

    att = UlyssesAttention(Attention(), shard)
    g = torch.Generator().manual_seed(L)
    full = [torch.randn(2, L, heads, 8, generator=g, dtype=torch.float64) for _ in range(6)]
    q, k, v, tq, tk, tv = (x.clone().requires_grad_(i < 3) for i, x in enumerate(full))
    w = torch.randn(2, L, heads, 8, generator=g, dtype=torch.float64)
    out_ref, tan_ref = jvp_attention(q, k, v, tq, tk, tv, block_mask=mask)
    (out_ref * w).sum().backward()
    grads_ref = [x.grad for x in (q, k, v)]
    local = [shard.shard(x.detach(), dim=1).requires_grad_(i < 3) for i, x in enumerate(full)]
    out, tan = att(*local, block_mask=mask)
    out_full, tan_full = shard.gather(out, dim=1), shard.gather(tan, dim=1)
    (out_full * w).sum().backward()
    grads = [shard.gather(x.grad, dim=1) for x in local[:3]]
    return max([maxerr(out_full, out_ref), maxerr(tan_full, tan_ref)] + [maxerr(a, b) for a, b in zip(grads, grads_ref)])


@check
def ulysses_attention():
    # float64 reference attention on both sides: the exchanges only move numbers, so agreement is ~1e-15
    errs = {f"L={L}{' causal' if m else ''}": _ulysses_attention(L, 4, torch.ones(L, L).tril().bool() if m else None)
            for L, m in ((8, False), (7, False), (7, True))}
    return max(errs.values()) < 1e-12, max(errs.values()), str(errs)


@check
def ulysses_heads_error():
    try:
        _ulysses_attention(8, 3, None)
        return False, 0.0, "no error for 3 heads on 2 ranks"
    except ValueError as e:
        return "must divide the number of attention heads 3" in str(e), 0.0, str(e)


def _cp_model_errors(make, inputs, tangents, loss_fn, jvp_fn):
    mesh = build_mesh(1, 1, 2)
    ref, model = make(), make()
    parallelize(model, mesh, ParallelConfig(param_dtype=None, reduce_dtype=None))
    out_ref, out = ref(*inputs), model(*inputs)
    loss_fn(out_ref).backward()
    loss_fn(out).backward()
    with torch.no_grad():
        tan_ref, tan = jvp_fn(ref, inputs, tangents)[1], jvp_fn(model, inputs, tangents)[1]
    errs = {"out": maxerr(out, out_ref), "tangent": maxerr(tan, tan_ref),
            "grad": max(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))}
    return errs


@check
def cp_tiny_dit():
    """CP=2 (with FSDP over the CP ranks) on the tiny seam network, 7 tokens (padded to 8): output,
    torch.func.jvp tangent through the whole CP network, and parameter gradients vs one process."""
    x, t = _batch(torch.float64, b=2)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    errs = _cp_model_errors(lambda: tiny_dit().double(), (x, t), (tx, tt), lambda o: (o**2).sum(),
                            lambda m, i, tg: torch.func.jvp(lambda a, b: m(a, b), i, tg))
    return max(errs.values()) < 1e-12, max(errs.values()), str(errs)


@check
def cp_wan_dit():
    """CP=2 on the real tiny WanDiT (float64): plain forward, forward_jvp, gradients; token counts 32 and 9
    (odd: padded)."""
    from rcm_nets.wan import WanDiT

    def make():
        net = WanDiT.from_config("tiny").double()
        net.init_weights(torch.Generator().manual_seed(0))
        torch.nn.init.normal_(net.head.head.weight, std=0.1, generator=torch.Generator().manual_seed(1))
        return net

    errs = {}
    for shape in ((2, 16, 2, 8, 8), (1, 16, 1, 6, 6)):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 1000
        c = torch.randn(shape[0], 16, 32, generator=g, dtype=torch.float64)
        tx, tt = torch.randn_like(x), torch.randn_like(t)
        e = _cp_model_errors(make, (x, t, c), (tx, tt), lambda o: (o**2).sum(),
                             lambda m, i, tg: m.forward_jvp(*i, *tg))
        errs[str(shape)] = e
    worst = max(v for e in errs.values() for v in e.values())
    return worst < 1e-10, worst, str(errs)


@check
def dcp_roundtrip():
    """Checkpointer under FSDP: sync save / load into a fresh sharded model + optimizer; async save keeps
    the staged values even if parameters change before wait(); per-rank states come back per rank."""
    from rcm_train.checkpoint import Checkpointer, ModelState, OptimizerState, export_module, load_part
    from rcm_train.trainer import TrainState

    root = Path(OUT) / "ckpt"
    mesh = build_mesh(1, 2, 1)

    def make():
        m = tiny_dit()
        parallelize(m, mesh, ParallelConfig(param_dtype=None))
        return m, build_optimizer(m, OptimizerConfig(lr=1e-2, warmup_steps=0))

    model, opt = make()
    x, t = _batch(torch.float32)
    (model(x, t) ** 2).mean().backward()
    opt.step()
    ts = TrainState(iteration=5)
    torch.manual_seed(100 + dist.get_rank())
    state = {"student": ModelState(model), "student_optim": OptimizerState(model, opt), "trainer": ts}
    ck = Checkpointer(root, async_save=False)
    ck.save(5, state)
    expect_rng = torch.get_rng_state()
    saved = [p.full_tensor().clone() for p in model.parameters()]
    exp_avg_sq = [opt.state[p]["exp_avg_sq"].full_tensor().clone() for p in model.parameters()]
    model2, opt2 = make()
    torch.manual_seed(999)
    ts2 = TrainState()
    ck.load({"student": ModelState(model2), "student_optim": OptimizerState(model2, opt2), "trainer": ts2})
    errs = {"params": max(maxerr(p, s) for p, s in zip(model2.parameters(), saved)),
            "exp_avg_sq": max(maxerr(opt2.state[p]["exp_avg_sq"], s) for p, s in zip(model2.parameters(), exp_avg_sq))}
    ok = ts2.iteration == 5 and torch.equal(torch.get_rng_state(), expect_rng)
    # async: change parameters after the call returns; the checkpoint holds the values at the call
    cka = Checkpointer(root / "async", async_save=True)
    cka.save(6, state)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    cka.wait()
    model3, _ = make()
    cka.load({"student": ModelState(model3)})
    errs["async"] = max(maxerr(p, s) for p, s in zip(model3.parameters(), saved))
    # export gathers the full state dict with the module's own names; the DCP part reads back the same
    out = Path(OUT) / "student.safetensors"
    export_module(model3, out, dtype=None)
    part = load_part(ck.latest(), "student") if dist.get_rank() == 0 else {}
    if dist.get_rank() == 0:
        from safetensors.torch import load_file

        exported = load_file(out)
        names = list(tiny_dit().state_dict())
        ok = ok and sorted(exported) == sorted(names) and sorted(part) == sorted(names)
        errs["export"] = max(maxerr(exported[n], p) for n, p in zip(names, saved))
    return ok and max(errs.values()) == 0.0, max(errs.values()), str(errs)


OUT = ""


def main():
    global OUT
    rank, world, init_file, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    only = set(sys.argv[5].split(",")) if len(sys.argv) > 5 else None
    results = {}
    for name, fn in CHECKS.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        try:
            ok, err, detail = fn()
            results[name] = {"ok": bool(ok), "err": float(err), "detail": detail}
        except Exception:
            results[name] = {"ok": False, "err": float("nan"), "detail": traceback.format_exc()}
        dist.barrier()
    Path(OUT, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
