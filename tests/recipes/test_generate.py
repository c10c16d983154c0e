"""recipes/generate.py end to end on tiny networks written in the official file formats (no mocks).

The references are computed here from the same files through the package APIs directly (load_checkpoint,
Tokenizer + UMT5Encoder, rcm_losses samplers), so they check the recipe's wiring: prompt embeddings, the
negative prompt, seeds, schedules, sigma_max, the I2V conditioning and the expert switch. Videos are
checked by their frame count and size (mp4 is lossy).
"""

import json
from pathlib import Path

import _fixtures
import generate
import pytest
import torch

from rcm_losses import TrigFlowAdapter, flow_unipc_sample, rcm_sample
from rcm_nets.checkpoint import CheckpointError, load_checkpoint
from rcm_nets.wan import Tokenizer, UMT5Encoder, WanDiT
from rcm_pipelines.components import MissingFileError
from rcm_pipelines.testing import TINY_CLIP
from rcm_pipelines.video import read_video
from rcm_recipes.config import ConfigError, field_paths, load_config_file, preset_diff, resolve_config

_one_thread, assets = _fixtures._one_thread, _fixtures.assets  # shared pytest fixtures (module scope)


def _args(assets, out, *extra, size="[32,32]"):
    return [*assets.component_flags(), f"--video.size={size}", "--video.num_frames=5", "--device=cpu", f"--output={out}", *extra]


def _embed(assets, prompts, text_len):
    tok = Tokenizer(assets.tokenizer, max_length=text_len)
    enc = UMT5Encoder(**assets.t5_arch).eval()  # eval: no dropout
    load_checkpoint(enc, assets.t5)
    ids, mask = tok(prompts)
    with torch.no_grad():
        return enc(ids, mask)


def _dit(name, path):
    net = WanDiT.from_config(name) if name != "tiny-i2v-A14B" else WanDiT.from_config("tiny", in_dim=36)
    load_checkpoint(net, path)
    return net.eval()


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for path in field_paths(generate.GenerateConfig):
        if path not in ("dit", "vae", "text_encoder", "clip", "sampler", "sampler.causal", "video"):  # groups
            assert f"--{path} " in text or f"--{path}\n" in text, path
    assert "rcm-i2v-A14B-720p" in text  # presets



def test_presets_are_yaml_files_that_config_reads():
    """Every preset is configs/generate/<name>.yaml holding only values that differ from the defaults; the same
    file given to --config resolves to the preset. Reference values: the Python presets before the move (spot
    checks of the fields that define each; the full dumps were compared equal when the files were written)."""
    root = Path(generate.__file__).resolve().parents[1] / "configs" / "generate"
    assert sorted(p.stem for p in root.glob("*.yaml")) == sorted(generate.PRESETS)
    base = generate.GenerateConfig().model_dump(mode="json")
    for name, preset in generate.PRESETS.items():
        data = load_config_file(root / f"{name}.yaml")
        assert preset_diff(base, data) == data, name  # nothing equal to a default
        assert resolve_config(generate.GenerateConfig, [f"--config={root / name}.yaml"]) == preset, name
    expect = {  # name: (mode, sampler.kind, dit.config, dit.path, sigma_max, resolution)
        "rcm-t2v-1.3B-480p": ("t2v", "rcm", "t2v-1.3B", "checkpoints/rCM_Wan2.1_T2V_1.3B_480p.pt", None, "480p"),
        "rcm-t2v-14B-720p": ("t2v", "rcm", "t2v-14B", "checkpoints/rCM_Wan2.1_T2V_14B_720p.pt", 120.0, "720p"),
        "rcm-i2v-A14B-720p": ("i2v", "rcm", "i2v-A14B", "checkpoints/Wan2.2-I2V-A14B-high-rCM4.0-merged.pt", None,
                              "720p"),
        "teacher-t2v-14B": ("t2v", "unipc", "t2v-14B", "checkpoints/Wan2.1-T2V-14B.pth", None, "480p"),
        "teacher-i2v-A14B": ("i2v", "unipc", "i2v-A14B", "checkpoints/Wan2.2-I2V-A14B-high.pth", None, "720p"),
    }
    for name, want in expect.items():
        c = generate.PRESETS[name]
        assert (c.mode, c.sampler.kind, c.dit.config, c.dit.path, c.sampler.sigma_max, c.video.resolution) == want
    assert generate.PRESETS["teacher-i2v-A14B"].dit.low_noise_path == "checkpoints/Wan2.2-I2V-A14B-low.pth"

def test_bad_fields_are_named(capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--num_sampels=3"])
    assert e.value.code == 2
    assert "unknown field 'num_sampels'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"did you mean 'dit\.low_noise_path'"):
        resolve_config(generate.GenerateConfig, ["--dit.low_noise=x"])
    with pytest.raises(ConfigError, match=r"sampler\.num_steps for rcm must be 1\.\.4"):
        resolve_config(generate.GenerateConfig, ["--sampler.num_steps=5"])
    with pytest.raises(ConfigError, match="needs image_path"):
        resolve_config(generate.GenerateConfig, ["--mode=i2v"])
    with pytest.raises(ConfigError, match=r"field 'sampler\.kind'.*'rcm', 'euler', 'unipc' or 'causal'"):
        resolve_config(generate.GenerateConfig, ["--sampler.kind=ddim"])


def test_out_of_range_values_are_refused_before_loading():
    """Before: stream steps/frames/context noise and video sizes out of range failed only after the models
    loaded, and --mid_t in the wrong order was accepted."""
    for flag, msg in [("--sampler.mid_t=[1.0,1.4]", r"mid_t \[1.0, 1.4\] must be strictly decreasing"),
                      ("--sampler.causal.times=[0.5,1.5]", r"sampler\.causal\.times.* must be strictly decreasing"),
                      ("--sampler.causal.context_noise=1.0", r"sampler\.causal\.context_noise"),
                      ("--sampler.causal.frames_per_block=0", r"sampler\.causal\.frames_per_block"),
                      ("--sampler.guidance=-1", r"sampler\.guidance"),
                      ("--video.num_frames=6", r"num_frames must be 1 \+ 4k"),
                      ("--video.size=[30,32]", "positive multiples of 16"),
                      ("--video.fps=0", r"video\.fps"),
                      ("--num_samples=0", "num_samples")]:
        with pytest.raises(ConfigError, match=msg) as err:
            resolve_config(generate.GenerateConfig, [flag])
        # one line naming the problem: a cross-field check does not dump the whole config it was given
        assert len(str(err.value).splitlines()) == 2 and len(str(err.value)) < 300, str(err.value)[:400]


def test_causal_sampler_flags_are_the_stream_spec():
    """--sampler.causal.* is recipes/stream.py's StreamSpec; the rolling-cache fields are refused (the pipeline's
    cache holds the whole video: a set value would be ignored), and num_steps must agree with the times."""
    cfg = resolve_config(generate.GenerateConfig, ["--sampler.kind=causal", "--sampler.causal.times=[[0.9,0.5],[0.8]]",
                                                   "--sampler.causal.guidance=2", "--sampler.causal.kv_dtype=int8"])
    assert type(cfg.sampler.causal).__name__ == "StreamSpec" and cfg.sampler.causal.kv_dtype == "int8"
    assert cfg.sampler.steps() == 2 and cfg.sampler.uses_cfg()
    assert cfg.sampler.negative_text() == cfg.sampler.causal.negative_prompt
    for flag in ("window_frames=4", "sink_frames=1", "extrapolation=infinity_rope", "trained_frames=8"):
        with pytest.raises(ConfigError, match=rf"sampler\.causal\.{flag.split('=')[0]} applies to rolling caches"):
            resolve_config(generate.GenerateConfig, ["--sampler.kind=causal", f"--sampler.causal.{flag}"])
    with pytest.raises(ConfigError, match=r"sampler\.num_steps=3 but sampler\.causal\.times gives 4 steps"):
        resolve_config(generate.GenerateConfig, ["--sampler.kind=causal", "--sampler.num_steps=3"])
    resolve_config(generate.GenerateConfig, ["--sampler.causal.window_frames=4"])  # not causal: unused, accepted

def test_failed_run_leaves_no_sidecar_claiming_the_old_video(assets, tmp_path):
    """Before: <output>.yaml was rewritten before a run that then failed, beside a video it did not describe."""
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old video")
    out.with_suffix(".yaml").write_text("old: config\n")
    with pytest.raises(CheckpointError, match="missing"):  # tiny weights do not fit t2v-1.3B: fails while loading
        generate.main(_args(assets, out, "--dit.config=t2v-1.3B", f"--dit.path={assets.t2v}"))
    assert out.read_bytes() == b"old video" and not out.with_suffix(".yaml").exists()


def test_missing_files_name_the_field(assets, tmp_path):
    with pytest.raises(MissingFileError, match=r"--dit\.path"):
        generate.main(_args(assets, tmp_path / "x.mp4", f"--dit.path={tmp_path / 'no.pth'}"))
    with pytest.raises(MissingFileError, match=r"--text_encoder\.tokenizer"):
        generate.main(_args(assets, tmp_path / "x.mp4", f"--dit.path={assets.t2v}", "--dit.config=tiny",
                            f"--text_encoder.tokenizer={tmp_path / 'none'}"))
    assert not (tmp_path / "x.mp4").exists()


def test_t2v_rcm_matches_direct_sampling(assets, tmp_path, capsys):
    out = tmp_path / "t2v.mp4"
    res = generate.main(_args(assets, out, "--dit.config=tiny", f"--dit.path={assets.t2v}", "--num_samples=2",
                              "--sampler.num_steps=3", "--seed=7", "--prompt=a cat runs across the green field",
                              "--save_latents=true"))
    assert res["videos"] == [out]
    frames = read_video(out)
    assert frames.shape == (5, 32, 64, 3)  # 5 frames, 2 samples side by side
    assert (tmp_path / "t2v.yaml").is_file()
    printed = capsys.readouterr().out
    for stage in ("[time] load text encoder", "[time] text encoder", "[time] free text encoder", "[time] DiT steps",
                  "3 rcm steps = 3 DiT forward calls", "[time] VAE decode", "end to end"):
        assert stage in printed, stage
    # reference: same files, package APIs, the documented seeding (CPU generator seeded `seed`)
    ctx = _embed(assets, ["a cat runs across the green field"], 16).expand(2, -1, -1)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((2, 16, 2, 4, 4), generator=g)
    want = rcm_sample(TrigFlowAdapter(_dit("tiny", assets.t2v), input_dtype=torch.float32), noise, ctx,
                      generator=g, num_steps=3, sigma_max=80.0, mid_t=(1.5, 1.4, 1.0))
    got = torch.load(tmp_path / "t2v.latents.pt")[0]
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)  # same float32 ops in the same order


def test_teacher_unipc_cfg_with_prompt_file(assets, tmp_path):
    res = generate.main(_args(assets, tmp_path / "teacher.mp4", "--dit.config=tiny", f"--dit.path={assets.t2v}",
                              "--sampler.kind=unipc", "--sampler.num_steps=3", f"--prompt_file={assets.prompts}",
                              "--sampler.negative_prompt=blurry static", "--sampler.guidance=4", "--save_latents=true"))
    assert [p.name for p in res["videos"]] == ["teacher_000.mp4", "teacher_001.mp4", "teacher_002.mp4"]
    prompts = [ln for ln in assets.prompts.read_text().splitlines() if ln.strip()]
    emb = _embed(assets, [*prompts, "blurry static"], 16)
    net = _dit("tiny", assets.t2v)
    got = torch.load(tmp_path / "teacher.latents.pt")
    for i in (0, 2):  # prompt i uses seed + i
        noise = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(i))
        want = flow_unipc_sample(net, noise, emb[i : i + 1], emb[3:4], guidance=4.0, num_steps=3, shift=5.0,
                                 sigma_max=5000.0, input_dtype=torch.float32)
        torch.testing.assert_close(got[i], want.float(), rtol=0, atol=1e-6)


def test_i2v_two_experts_switch_at_the_boundary(assets, tmp_path):
    base = _args(assets, tmp_path / "i2v.mp4", "--mode=i2v", "--dit.config=tiny-i2v-A14B",
                 f"--dit.path={assets.i2v_high}", f"--dit.low_noise_path={assets.i2v_low}",
                 f"--image_path={assets.image}")
    # sigma_max 200 (I2V default) then mid_t 1.5, 1.4, 1.0: RF times 0.995, 0.934, 0.853, 0.609
    res = generate.main(base)
    assert res["expert_calls"] == {"high": 2, "low": 2}
    assert read_video(res["videos"][0]).shape == (5, 32, 32, 3)
    res = generate.main([*base, "--sampler.boundary=0.8", "--sampler.ode=true", "--sampler.offload_experts=false"])
    assert res["expert_calls"] == {"high": 3, "low": 1}


def test_i2v_wan21_clip_adaptive_resolution(assets, tmp_path):
    # portrait preset (32 wide, 48 high) + a landscape 56x40 image -> same area, the image's aspect: 48x32
    res = generate.main(_args(assets, tmp_path / "i2v21.mp4", "--mode=i2v", "--dit.config=tiny-i2v",
                              f"--dit.path={assets.i2v}", f"--clip.path={assets.clip}",
                              f"--clip.arch={json.dumps(TINY_CLIP)}", f"--image_path={assets.image}",
                              "--video.adaptive_resolution=true", size="[32,48]"))
    assert read_video(res["videos"][0]).shape == (5, 32, 48, 3)
    assert "CLIP image encoder" in res["timing"]
    with pytest.raises(MissingFileError, match=r"--clip\.path"):
        generate.main(_args(assets, tmp_path / "x.mp4", "--mode=i2v", "--dit.config=tiny-i2v",
                            f"--dit.path={assets.i2v}", f"--clip.path={tmp_path / 'none.pth'}",
                            f"--image_path={assets.image}"))
