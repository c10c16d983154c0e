"""recipes/causal_distill.py end to end on the tiny network (CPU): every stage of the staged Causal-rCM
schedule (and the ODE-init alternative, causal I2V, replay) runs, its losses are finite, checkpoints / exports
/ the streaming sample video are written; plus the recipe-side bindings (teacher-forcing pass, cached rollout)
against the DiT's own causal passes."""

import json
import math
from functools import partial
from pathlib import Path

import causal_distill
import pytest
import torch
from _causal_assets import C, H, T, W, tiny_net, write_data

from rcm_kernels.blockmask import BlockLayout, teacher_forcing
from rcm_losses import TrigFlowAdapter
from rcm_losses.causal import FrameBlocks, self_forcing_rollout, teacher_forcing_velocity
from rcm_nets.wan.causal import make_kv_cache, video_kv_cache
from rcm_train.objectives import causal as causal_driver
from rcm_train.objectives.causal import (
    CachedBlocks,
    CausalObjectiveConfig,
    CausalRCMObjective,
    tf_velocity,
)
from rcm_train.stages import StageResult
from rcm_train.trainer import ScheduleConfig, StepContext

EXACT = dict(input_dtype=None, timestep_dtype=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (root conftest)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("causal_assets")
    torch.save(tiny_net(0).state_dict(), d / "teacher.pth")
    write_data(d)
    return d


def _cache_factory(blocks, cfg):
    return partial(video_kv_cache, layout=BlockLayout(blocks.frames_per_block, blocks.first), kv_dtype=cfg.kv_dtype)


def _args(assets, out, preset, *extra):
    return [
        f"--preset={preset}",
        f"--output_dir={out}",
        f"--data.shards={assets / 'data' / 'shard_*.tar'}",
        f"--model.teacher.path={assets / 'teacher.pth'}",
        f"--negative_embed_path={assets / 'negative.pt'}",
        *extra,
    ]


def _metrics(out: Path, stage: str) -> list[dict]:
    lines = (out / "logs" / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _check_stage(out: Path, stage: str, losses: list[str]):
    rows = _metrics(out, stage)
    for key in losses:
        vals = [r[f"{key}/loss"] for r in rows if f"{key}/loss" in r]
        assert vals and all(math.isfinite(v) for v in vals), (stage, key, rows)
    assert (out / "checkpoints" / stage / "latest").exists()
    assert (out / stage / "student.safetensors").exists() and (
        out / stage / "student_ema.safetensors"
    ).exists()
    assert list((out / "logs" / stage / "media").glob("samples_*.mp4"))


def test_staged_causal_rcm_runs_end_to_end(assets, tmp_path):
    """teacher_tf -> tf_dcm -> tf_scm -> sf_dmd on the tiny config: finite losses, DCP checkpoints, exports,
    streaming samples; the DMD stage alternates student (sf_dmd) and critic iterations."""
    out = tmp_path / "run"
    res = causal_distill.main(_args(assets, out, "tiny-causal-rcm"))
    _check_stage(out, "teacher_tf", ["flow"])
    _check_stage(out, "tf_dcm", ["tf_dcm"])
    _check_stage(out, "tf_scm", ["tf_scm"])
    _check_stage(out, "sf_dmd", ["sf_dmd", "critic"])
    assert (out / "causal_teacher.safetensors").exists() and res["student"] == out / "student.safetensors"
    assert (out / "student.safetensors").exists() and (out / "config.yaml").exists()
    again = causal_distill.main(
        _args(assets, out, "tiny-causal-rcm")
    )  # a rerun resumes: every stage complete
    assert again["stages"]["sf_dmd"].iteration == 3
    assert sorted(p.name for p in (out / "attempts").iterdir()) == ["001.yaml", "002.yaml"]
    # a rerun with another student learning rate would keep the restored optimizer's: refused, named
    from rcm_recipes.rundir import RunConfigMismatch

    with pytest.raises(RunConfigMismatch, match=r"optimizer.lr: .* -> 0.5"):
        causal_distill.main(_args(assets, out, "tiny-causal-rcm", "--optimizer.lr=0.5", "--allow_config_change=true"))
    assert sorted(p.name for p in (out / "attempts").iterdir()) == ["001.yaml", "002.yaml"]


def test_ode_init_i2v_replay_runs(assets, tmp_path):
    """ODE-pair initialization then self-forcing DMD with replayed backprop and noisy context; causal I2V."""
    out = tmp_path / "ode"
    causal_distill.main(
        _args(
            assets,
            out,
            "tiny-ode-init",
            "--stage2.objective.replay=true",
            "--stage2.objective.context_noise=0.2",
            "--stage2.objective.sf_exit=cycle",
            "--sample.every=0",
        )
    )
    rows = _metrics(out, "ode")
    assert all(math.isfinite(r["ode/loss"]) for r in rows)
    assert all(math.isfinite(r[k]) for r in _metrics(out, "sf_dmd") for k in r if k.endswith("/loss"))
    i2v = tmp_path / "i2v"
    causal_distill.main(
        _args(
            assets,
            i2v,
            "tiny-causal-rcm",
            "--blocks.i2v=true",
            "--stage1.iterations=1",
            "--stage3.iterations=0",
            "--stage4.iterations=2",
            "--sample.every=0",
        )
    )
    for stage, key in (("teacher_tf", "flow"), ("tf_dcm", "tf_dcm"), ("sf_dmd", "sf_dmd")):
        assert all(math.isfinite(r[f"{key}/loss"]) for r in _metrics(i2v, stage) if f"{key}/loss" in r)


def test_bad_configs_name_the_field(assets, tmp_path):
    with pytest.raises(SystemExit):
        causal_distill.main(_args(assets, tmp_path, "tiny-causal-rcm", "--stage2.objective.ode=true"))
    with pytest.raises(ValueError, match="flow trains a causal teacher"):
        CausalObjectiveConfig(flow="tf", dmd=True)
    with pytest.raises(ValueError, match="trains nothing"):
        CausalObjectiveConfig()


def test_shared_loop_settings_reach_every_stage(assets, tmp_path, monkeypatch):
    """The run block (--run.train.*: EMA iteration shift, which the old causal loop dropped, grad_accum, seed)
    is what the driver gets for every stage (tests/train/test_stages.py follows it into the loop)."""
    seen = []

    def fake_run_stage(stage, run, **kw):
        seen.append((stage.name, run.train.ema_iteration_shift, run.train.grad_accum, run.train.seed))
        return StageResult(stage.iterations, tmp_path, {"student": tmp_path, "student_ema": tmp_path})

    monkeypatch.setattr(causal_driver, "run_stage", fake_run_stage)
    monkeypatch.setattr(causal_driver, "load_stage_student", lambda res: {})
    monkeypatch.setattr(causal_driver, "publish", lambda exports, out: {})
    causal_distill.main(_args(assets, tmp_path / "run", "tiny-causal-rcm", "--run.train.ema_iteration_shift=7",
                              "--run.train.grad_accum=2", "--run.train.seed=5", "--sample.every=0"))
    assert seen == [(name, 7, 2, 5) for name in ("teacher_tf", "tf_dcm", "tf_scm", "sf_dmd")]


# ------------------------------------------------------------------------------------------ bindings
def test_tf_binding_equals_the_dit_teacher_forcing_pass():
    """The objective's packed velocity through the rcm_losses adapter = the DiT's forward over the packed
    sequence built by hand (clean context at time 0, repeated RoPE positions, the teacher-forcing mask)."""
    net, blocks = tiny_net(1).double(), FrameBlocks(T, 2, 1)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, C, T, H, W, generator=g, dtype=torch.float64)
    x_s = torch.randn(1, C, T, H, W, generator=g, dtype=torch.float64)
    ctx = torch.randn(1, 6, 32, generator=g, dtype=torch.float64)
    ts = blocks.expand(torch.tensor([[300.0, 800.0, 100.0]], dtype=torch.float64))
    ours = teacher_forcing_velocity(tf_velocity(net, blocks, x0)[0], x0, **EXACT)(x_s, ts, ctx)
    mask = teacher_forcing(blocks.num_blocks, 2, (H // 2) * (W // 2), first_block_frames=1)
    packed_t = torch.cat([torch.zeros_like(ts), ts], dim=1)
    ref = net(torch.cat([x0, x_s], dim=2), packed_t, ctx, block_mask=mask, frame_pos=torch.cat([torch.arange(T)] * 2))
    ref = ref[:, :, T:]
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


def test_cached_rollout_matches_the_teacher_forcing_pass_and_grad_hits_exit_steps():
    """The recipe's KV-cache binding (``WanDiT.forward_block``) through ``self_forcing_rollout``: each block's
    exit prediction equals one packed teacher-forcing pass over (committed blocks ; exit inputs), and only
    the exit-step call of each block receives gradient (tensor hooks on every call's output)."""
    net, blocks = tiny_net(2), FrameBlocks(T, 2, 1)
    ctx = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4))
    cache = make_kv_cache(
        net,
        batch=1,
        height=H,
        width=W,
        layout=BlockLayout(blocks.frames_per_block, blocks.first),
        window_frames=T,
        rolling=False,
        kv_dtype="float32",
    )
    binding = CachedBlocks(net, cache, ctx, blocks, input_dtype=torch.float32, timestep_dtype=None)
    calls, got_grad = {}, []

    def denoise(x, t, i):
        pred = binding.denoise(x, t, i)
        k = calls[i] = calls.get(i, -1) + 1
        if pred.x0.requires_grad:
            pred.x0.register_hook(lambda g, key=(i, k): got_grad.append(key))
        return pred

    sched = [math.pi / 2, 1.2, 0.8]
    exits = (1, 2, 0)
    out = self_forcing_rollout(
        denoise,
        binding.commit,
        (1, C, T, H, W),
        blocks,
        sched,
        generator=torch.Generator().manual_seed(5),
        exit_steps=exits,
    )
    assert not any(x.requires_grad for x in cache.storage())
    (out.x0 * torch.randn(out.x0.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
    assert sorted(got_grad) == [(0, 1), (1, 2), (2, 0)]
    assert all(p.grad is not None for p in net.blocks.parameters())
    binding.reset()
    with torch.no_grad():
        out = self_forcing_rollout(
            binding.denoise,
            binding.commit,
            (1, C, T, H, W),
            blocks,
            sched,
            generator=torch.Generator().manual_seed(5),
            exit_steps=(2, 2, 2),
        )
        context, noisy = torch.cat(out.contexts, 2), torch.cat(out.exit_inputs, 2)
        t = torch.full((1, T), sched[2], dtype=torch.float64)
        vel = teacher_forcing_velocity(
            tf_velocity(net, blocks, context)[0], context, input_dtype=torch.float32, timestep_dtype=None
        )
        pred = TrigFlowAdapter(vel, input_dtype=torch.float32, timestep_dtype=None)(noisy, t, ctx).x0
    # float32 network: cached vs masked attention sum in different orders (~1e-6 relative)
    torch.testing.assert_close(pred.float(), out.x0, atol=5e-5, rtol=5e-5)


def test_objective_closures_combine_tf_scm_with_sf_dmd_and_run_df():
    """Closure sets per phase: a combined stage gives tf_scm + sf_dmd in student iterations (sf_dmd only after
    the warmup) and the critic otherwise; every closure (and the diffusion-forcing flow) yields a finite loss
    with gradients on the trained network."""
    blocks = FrameBlocks(T, 2, 1)
    models = {
        "student": tiny_net(0),
        "causal_teacher": tiny_net(1),
        "teacher": tiny_net(2),
        "fake_score": tiny_net(3),
    }
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(1, C, T, H, W, generator=g), "embed": torch.randn(1, 6, 32, generator=g)}
    cfg = CausalObjectiveConfig(
        cm="scm", dmd=True, input_dtype="float32", kv_dtype="float32", sf_schedule=[1.0, 0.8]
    )
    obj = CausalRCMObjective(cfg, blocks, negative_embed=torch.zeros(16, 32), make_cache=_cache_factory(blocks, cfg))
    sched = ScheduleConfig(tangent_warmup=2, student_update_freq=2)
    ctx = lambda phase, it: StepContext(
        phase, it, it, sched, torch.Generator().manual_seed(it), has_critic=True
    )
    assert set(obj.closures(models, batch, ctx("student", 0))) == {"tf_scm"}
    closures = obj.closures(models, batch, ctx("student", 2))
    assert set(closures) == {"tf_scm", "sf_dmd"}
    for name, closure in {**closures, **obj.closures(models, batch, ctx("critic", 3))}.items():
        trained = models["fake_score" if name == "critic" else "student"]
        trained.zero_grad()
        loss, _ = closure()
        loss.sum().backward()
        assert torch.isfinite(loss).all(), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters()), name
    df_cfg = CausalObjectiveConfig(flow="df", input_dtype="float32")
    df = CausalRCMObjective(df_cfg, blocks, make_cache=_cache_factory(blocks, df_cfg))
    loss, diag = df.closures(models, batch, ctx("student", 0))["flow"]()
    t = diag["t"]
    assert torch.isfinite(loss).all() and torch.equal(t[:, 1], t[:, 2]) and not torch.equal(t[:, 2], t[:, 3])
