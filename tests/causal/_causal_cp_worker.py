"""One rank of the 2-process gloo job of tests/causal/test_causal_cp.py: causal training closures of
``rcm_train.objectives.causal`` on tiny WanDiTs under Ulysses CP = 2 (FSDP over the two CP ranks) against the
same closures on unparallelized copies in the same process (no communication: the independent reference).

Usage: python _causal_cp_worker.py RANK WORLD INIT_FILE OUT_DIR. Writes ``OUT_DIR/rank{RANK}.json``:
``{check: {"loss": worst relative loss error, "grad": worst relative gradient error, "detail"}}``.
Geometry: latents 6x6 (3x3 = 9 tokens per frame: odd, so every cached block and the teacher-forcing pass
are padded on 2 ranks), 5 frames in blocks [1, 2, 2].
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rcm_kernels.blockmask import BlockLayout
from rcm_losses.causal import FrameBlocks
from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import video_kv_cache
from rcm_nets.wan.configs import get_config
from rcm_train.objectives.causal import CausalObjectiveConfig, CausalRCMObjective
from rcm_train.parallel import ParallelConfig, build_mesh, parallelize
from rcm_train.trainer import ScheduleConfig, StepContext

C, T, H, W = 16, 5, 6, 6
BLOCKS = FrameBlocks(T, 2, 1)
PAR = ParallelConfig(param_dtype=None, reduce_dtype=None, forward_methods=["forward_block"])


def tiny_net(seed: int, dtype: torch.dtype) -> WanDiT:
    net = WanDiT(get_config("tiny"))
    g = torch.Generator().manual_seed(seed)
    net.init_weights(generator=g)
    nn.init.normal_(net.head.head.weight, std=0.05, generator=g)  # a zero head would output exactly 0
    return net.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def compare(roles: dict[str, str], cfg: CausalObjectiveConfig, closure: str, phase: str, dtype: torch.dtype,
            *, trained: str = "student", sac: str = "none") -> dict:
    """Run ``closure`` of the ``phase`` on reference networks and on CP copies (same weights, batch and step
    generator), backward ``loss.sum()`` on each; relative errors of the loss and the trained network's grads."""
    mesh = build_mesh(1, 1, 2)
    seeds = {"student": 0, "causal_teacher": 1, "teacher": 2, "fake_score": 3}
    ref = {r: tiny_net(seeds[r], dtype).requires_grad_(r == trained) for r in roles}
    par = lambda r: PAR.model_copy(update={"sac": sac if r == trained else "none"})
    cp = {r: parallelize(tiny_net(seeds[r], dtype), mesh, par(r)).requires_grad_(r == trained) for r in roles}
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(1, C, T, H, W, generator=g), "embed": torch.randn(1, 6, 32, generator=g)}
    make_cache = partial(video_kv_cache, layout=BlockLayout(BLOCKS.frames_per_block, BLOCKS.first),
                         kv_dtype=cfg.kv_dtype)
    losses = []
    for models in (ref, cp):
        obj = CausalRCMObjective(cfg, BLOCKS, negative_embed=torch.zeros(16, 32), make_cache=make_cache)
        ctx = StepContext(phase, 3, 3, ScheduleConfig(tangent_warmup=2, student_update_freq=2),
                          torch.Generator().manual_seed(7), has_critic=True)
        loss, _ = obj.closures(models, batch, ctx)[closure]()
        loss.sum().backward()
        losses.append(loss.detach())
    grads = {n: _rel(p.grad, q.grad) for (n, p), (_, q) in zip(cp[trained].named_parameters(),
                                                                  ref[trained].named_parameters())}
    worst = max(grads, key=grads.get)
    caches = [c.layer(0).k.shape[2] for c in obj._caches.values()]  # the CP objective's KV cache: local heads
    return {"loss": _rel(losses[1], losses[0]), "grad": grads[worst], "cp_seam": type(cp[trained].seq_shard).__name__,
            "cache_heads": caches, "detail": f"loss {losses[0].tolist()}, worst grad {worst}"}


def with_env(key: str, value: str, fn):
    """``fn()`` with ``os.environ[key] = value`` (restored after)."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


F64 = dict(input_dtype="float64", timestep_dtype=None)
F32 = dict(input_dtype="float32", timestep_dtype=None, kv_dtype="float32", sf_schedule=[1.0, 0.8])
CHECKS = {
    # masked teacher-forcing pass (float64): primal, tangents (forward_jvp through the JVP attention seam) and
    # gradients through Ulysses' all-to-alls
    "tf_scm": lambda: compare({"student": 1, "causal_teacher": 1}, CausalObjectiveConfig(cm="scm", **F64),
                              "tf_scm", "student", torch.float64),
    "tf_dcm": lambda: compare({"student": 1, "causal_teacher": 1}, CausalObjectiveConfig(cm="dcm", **F64),
                              "tf_dcm", "student", torch.float64),
    # the same pass through the fused (Triton) masked JVP attention kernel, float32 (TRITON_INTERPRET=1 on CPU)
    "tf_scm_triton": lambda: with_env("RCM_JVP_IMPL", "triton", lambda: compare(
        {"student": 1, "causal_teacher": 1}, CausalObjectiveConfig(cm="scm", input_dtype="float32", timestep_dtype=None),
        "tf_scm", "student", torch.float32)),
    "flow_tf": lambda: compare({"student": 1}, CausalObjectiveConfig(flow="tf", **F64), "flow", "student",
                               torch.float64),
    # the block-causal full-sequence pass: diffusion forcing and ODE regression (bidirectional teacher ODE)
    "flow_df": lambda: compare({"student": 1}, CausalObjectiveConfig(flow="df", **F64), "flow", "student",
                               torch.float64),
    "ode": lambda: compare({"student": 1, "teacher": 1}, CausalObjectiveConfig(ode=True, ode_steps=4, **F64), "ode",
                           "student", torch.float64),
    # the cached self-forcing rollout (float32: the KV cache stores at most float32) with head-sharded k/v
    "sf_dmd": lambda: compare({"student": 1, "teacher": 1, "fake_score": 1}, CausalObjectiveConfig(dmd=True, **F32),
                              "sf_dmd", "student", torch.float32),
    "sf_dmd_replay": lambda: compare({"student": 1, "teacher": 1, "fake_score": 1},
                                     CausalObjectiveConfig(dmd=True, replay=True, context_noise=0.2, **F32),
                                     "sf_dmd", "student", torch.float32),
    # activation checkpointing of the CP student: block recomputes in backward run after later (longer) blocks
    # were sharded, so each must cut the padding of its own sequence
    "sf_dmd_sac": lambda: compare({"student": 1, "teacher": 1, "fake_score": 1}, CausalObjectiveConfig(dmd=True, **F32),
                                  "sf_dmd", "student", torch.float32, sac="block_wise"),
    "tf_scm_sac": lambda: compare({"student": 1, "causal_teacher": 1}, CausalObjectiveConfig(cm="scm", **F64),
                                  "tf_scm", "student", torch.float64, sac="block_wise"),
    "critic": lambda: compare({"student": 1, "fake_score": 1}, CausalObjectiveConfig(dmd=True, **F32), "critic",
                              "critic", torch.float32, trained="fake_score"),
}


def main():
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    only = set(sys.argv[5].split(",")) if len(sys.argv) > 5 else set(CHECKS)
    results = {}
    for name, fn in ((n, f) for n, f in CHECKS.items() if n in only):
        torch.manual_seed(0)
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"loss": float("nan"), "grad": float("nan"), "detail": traceback.format_exc()}
        dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
