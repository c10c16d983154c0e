"""recipes/eval_vbench.py on tiny networks written in the official formats: the VBench file layout, seeds,
resume, every sampler kind against direct sampling, I2V plumbing, augmented prompts, and the score/report
stages through a stand-in `vbench` package (the real one is not installable here; the stand-in implements
the two calls the worker makes and scores how many of the files vbench would look up exist).
"""

import json
import shutil
import sys
import textwrap
from pathlib import Path

import _fixtures
import eval_vbench
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcm_kernels.blockmask import BlockLayout
from rcm_losses import TrigFlowAdapter, flow_euler_sample, rcm_sample
from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import Tokenizer, UMT5Encoder, WanDiT, WanVAE
from rcm_nets.wan.causal import make_kv_cache
from rcm_pipelines.components import DiTSpec, VAESpec
from rcm_pipelines.eval.harness import resolve_prompt_file
from rcm_pipelines.eval.score import VBenchRunError, VBenchUnavailableError
from rcm_pipelines.eval.suite import load_suite, rank_slice, sample_seed
from rcm_pipelines.pipeline import SamplerSpec, VideoPipeline, VideoSpec
from rcm_pipelines.stream_session import StreamSession
from rcm_pipelines.stream_spec import StreamSpec
from rcm_pipelines.streaming import stream_generate
from rcm_pipelines.testing import TINY_CLIP, TINY_VAE
from rcm_pipelines.timing import StageTimer
from rcm_pipelines.video import load_image, read_video, save_video
from rcm_recipes.config import ConfigError, load_config_file, preset_diff, resolve_config

_one_thread, assets = _fixtures._one_thread, _fixtures.assets  # shared pytest fixtures (module scope)

SUITE = [  # VBench's format; the first prompt appears twice (as in VBench_full_info.json), named once
    {"prompt_en": "a cat runs across the green field", "dimension": ["subject_consistency", "dynamic_degree"]},
    {"prompt_en": "birds flying under blue sky with clouds", "dimension": ["color"]},
    {"prompt_en": "a cat runs across the green field", "dimension": ["overall_consistency"]},
]


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "suite.json"
    path.write_text(json.dumps(SUITE))
    return path


def _args(assets, suite_file, out, *extra):
    return [*assets.component_flags(), "--dit.config=tiny", f"--dit.path={assets.t2v}", "--video.size=[32,32]",
            "--video.num_frames=5", "--device=cpu", f"--prompt_file={suite_file}", "--samples_per_prompt=2",
            "--stage=sample", f"--output_dir={out}", "--sampler.num_steps=2", *extra]


def _embed(assets, texts, text_len):
    tok = Tokenizer(assets.tokenizer, max_length=text_len)
    enc = UMT5Encoder(**assets.t5_arch).eval()
    load_checkpoint(enc, assets.t5)
    ids, mask = tok(texts)
    with torch.no_grad():
        return enc(ids, mask)


def _net(path, **kw):
    net = WanDiT.from_config("tiny", **kw)
    load_checkpoint(net, path)
    return net.eval()


def _vae(assets):
    vae = WanVAE(**TINY_VAE)
    load_checkpoint(vae, assets.vae)
    return vae.eval()



def test_presets_are_yaml_files_that_config_reads():
    """Every preset is configs/eval_vbench/<name>.yaml holding only values that differ from the defaults; the
    same file given to --config resolves to the preset. Reference values: the Python presets before the move."""
    root = Path(eval_vbench.__file__).resolve().parents[1] / "configs" / "eval_vbench"
    assert sorted(p.stem for p in root.glob("*.yaml")) == sorted(eval_vbench.PRESETS)
    base = eval_vbench.EvalVBenchConfig().model_dump(mode="json")
    for name, preset in eval_vbench.PRESETS.items():
        data = load_config_file(root / f"{name}.yaml")
        assert preset_diff(base, data) == data, name  # nothing equal to a default
        assert resolve_config(eval_vbench.EvalVBenchConfig, [f"--config={root / name}.yaml"]) == preset, name
    teacher = "outputs/vbench/teacher-t2v-1.3B"
    expect = {  # name: (suite, sampler.kind, dit.config, dit.path, output_dir, baseline)
        "teacher-t2v-1.3B": ("t2v", "unipc", "t2v-1.3B", "checkpoints/Wan2.1-T2V-1.3B.pth", teacher, None),
        "rcm-t2v-1.3B": ("t2v", "rcm", "t2v-1.3B", "checkpoints/rCM_Wan2.1_T2V_1.3B_480p.pt",
                         "outputs/vbench/rcm-t2v-1.3B", teacher),
        "causal-rcm-t2v-1.3B": ("t2v", "causal", "t2v-1.3B",
                                "outputs/causal_distill/1.3B-causal-rcm/student_ema.safetensors",
                                "outputs/vbench/causal-rcm-t2v-1.3B", teacher),
        "teacher-i2v-14B-480p": ("i2v", "unipc", "i2v-14B", "checkpoints/Wan2.1-I2V-14B-480P.pth",
                                 "outputs/vbench/teacher-i2v-14B", None),
    }
    for name, want in expect.items():
        c = eval_vbench.PRESETS[name]
        assert (c.suite, c.sampler.kind, c.dit.config, c.dit.path, c.output_dir, c.baseline) == want, name
    assert eval_vbench.PRESETS["teacher-i2v-14B-480p"].image_dir == "VBench/vbench2_beta_i2v/data/crop/16-9"

def test_suite_names_seeds_and_rank_split(suite_file, tmp_path):
    entries = load_suite(suite_file)
    assert [(e.index, e.prompt) for e in entries] == [(0, SUITE[0]["prompt_en"]), (1, SUITE[1]["prompt_en"])]
    assert entries[0].dimensions == ("subject_consistency", "dynamic_degree", "overall_consistency")
    assert [e.prompt for e in load_suite(suite_file, dimensions=["color"])] == [SUITE[1]["prompt_en"]]
    assert sample_seed(7, 3, 4) == 7 + 3 * 1000 + 4
    items = list(range(11))
    parts = [rank_slice(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    aug = tmp_path / "aug.txt"
    aug.write_text("a cat, detailed\nbirds, detailed\na cat again, detailed\n")
    e = load_suite(suite_file, augmented=aug)
    assert [x.text for x in e] == ["a cat, detailed", "birds, detailed"] and e[0].prompt == SUITE[0]["prompt_en"]
    aug.write_text("only one line\n")
    with pytest.raises(ValueError, match="has 1 lines but the suite file has 3 entries"):
        load_suite(suite_file, augmented=aug)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt_en": "a/b", "dimension": ["color"]}]))
    with pytest.raises(ValueError, match="cannot name a file"):
        load_suite(bad)


def test_sample_layout_resume_and_seeds(assets, suite_file, tmp_path):
    out = tmp_path / "rcm"
    res = eval_vbench.main(_args(assets, suite_file, out))["sample"]
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == sorted(f"{e['prompt_en']}-{i}.mp4" for e in SUITE[:2] for i in range(2))  # VBench layout only
    assert len(res["written"]) == 4 and res["skipped"] == 0
    frames = read_video(out / "videos" / names[0])
    assert frames.shape == (5, 32, 32, 3)
    manifest = json.loads((out / "manifest.json").read_text())["videos"]
    assert {(m["prompt_index"], m["sample"], m["seed"]) for m in manifest} == {(0, 0, 0), (0, 1, 1), (1, 0, 1000),
                                                                               (1, 1, 1001)}
    # resume: nothing redone; a lost video and a stale temp file: only that video is made again
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    again = eval_vbench.main(_args(assets, suite_file, out))["sample"]
    assert again["written"] == [] and again["skipped"] == 4
    lost = out / "videos" / names[1]
    lost.unlink()
    (out / ".tmp" / "stale-123.mp4").write_bytes(b"partial")
    again = eval_vbench.main(_args(assets, suite_file, out, "--samples_per_prompt=3"))["sample"]
    assert sorted(p.name for p in again["written"]) == sorted([names[1]] + [f"{e['prompt_en']}-2.mp4"
                                                                            for e in SUITE[:2]])
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in (out / "videos").iterdir() if p.name in mtimes
               and p.name != names[1])
    assert all(p.suffix == ".mp4" for p in (out / "videos").iterdir())
    # a resume with another sampler would mix two runs in one folder: refused, naming the field
    from rcm_recipes.rundir import RunConfigMismatch

    with pytest.raises(RunConfigMismatch, match=r"sampler.num_steps: 2 -> 1"):
        eval_vbench.main(_args(assets, suite_file, out, "--sampler.num_steps=1"))

    # the video of (prompt 1, sample 0) is what direct rcm sampling with seed 1000 gives: the direct pixels
    # go through the same mp4 writer (H.264 is lossy but deterministic), so the files decode to equal frames
    ctx = _embed(assets, [SUITE[1]["prompt_en"]], 16)
    net, vae = _net(assets.t2v), _vae(assets)

    def direct(seed):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, 16, 2, 4, 4), generator=g)
        x0 = rcm_sample(TrigFlowAdapter(net, input_dtype=torch.float32), noise, ctx, generator=g, num_steps=2,
                        sigma_max=80.0, mid_t=[1.5, 1.4, 1.0])
        with torch.no_grad():
            video = vae.decode(x0.float())[0]
        return read_video(save_video(video, tmp_path / f"direct_{seed}.mp4", fps=16)).astype(np.float64)

    got = read_video(out / "videos" / f"{SUITE[1]['prompt_en']}-0.mp4").astype(np.float64)
    err_same = np.abs(got - direct(1000)).max()
    err_other = np.abs(got - direct(1001)).mean()
    # float32 rounding may flip a pixel by one level before encoding, which the codec can spread a little
    assert err_same <= 2.0 and err_other > 10.0, (err_same, err_other)


def test_causal_spec_cfg_schedules_and_first_block_match_direct_sampling(assets):
    """sampler.causal is a StreamSpec: CFG (a second cache), per-block times and the last-step refresh reach
    stream_generate as a direct call with the same values (float32, same ops: 1e-5); causal I2V's block 0 is
    the image resized bicubically and VAE-encoded (reference computed here), the session's first block too."""
    ctx, neg = _embed(assets, ["a cat runs", "static blurry"], 16).split(1)
    net, vae = _net(assets.t2v), _vae(assets)
    times = [[0.9, 0.6], [0.7]]
    spec = StreamSpec(times=times, frames_per_block=1, kv_dtype="float32", guidance=2.5, refresh="last_step",
                      clean_refresh_blocks=1)
    s = _sampler(assets, SamplerSpec(kind="causal", causal=spec))
    assert s.spec.steps() == 2 and s.spec.uses_cfg()
    got = s.latent(ctx, neg[0], s.condition(None), seed=4)
    layout = BlockLayout(1)

    def direct(**kw):
        caches = [make_kv_cache(net, batch=1, height=4, width=4, layout=layout, window_frames=2, rolling=False,
                                kv_dtype="float32") for _ in range(2)]
        blocks = stream_generate(net, ctx, caches[0], num_frames=2, layout=layout, latent_shape=(1, 16, 4, 4),
                                 generator=torch.Generator().manual_seed(4), times=times, refresh="last_step",
                                 clean_refresh_blocks=1, **kw, uncond_cache=caches[1] if kw else None)
        return torch.cat([b.x0 for b in blocks], dim=2)

    torch.testing.assert_close(got, direct(negative=neg, guidance=2.5), rtol=1e-5, atol=1e-5)
    assert (got - direct()).abs().max() > 1e-3  # guidance mattered: the check above would see it dropped

    # causal I2V: the image is block 0 (one latent frame)
    s = _sampler(assets, SamplerSpec(kind="causal", causal=StreamSpec(times=[0.9], frames_per_block=1,
                                                                      kv_dtype="float32")), mode="i2v")
    cond = s.condition(Path(assets.image))
    img = F.interpolate(load_image(assets.image)[None], size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        ref = vae.encode(img.clamp(-1, 1)[:, :, None]).float()
    torch.testing.assert_close(cond.first, ref, rtol=1e-6, atol=1e-6)
    x0 = s.latent(ctx, None, cond, seed=3)
    assert x0.shape == (1, 16, 2, 4, 4) and torch.equal(x0[:, :, :1], cond.first)
    session = StreamSession(StreamSpec(first_block_frames=1), dit=DiTSpec(config="tiny", path=str(assets.t2v)),
                            vae=VAESpec(path=str(assets.vae), arch=TINY_VAE), device=torch.device("cpu"),
                            dtype=torch.float32)
    torch.testing.assert_close(session.first_block(load_image(assets.image), (32, 32)), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_causal_cuda_graph_matches_eager_cuda(assets):
    """sampler.causal.cuda_graph reaches stream_generate: CUDA-graph replays give the eager latents (float32
    cache, same kernels replayed: 1e-5)."""
    pytest.importorskip("ftfy", reason="the umT5 prompt cleaning needs ftfy (rcm-nets[tokenizer])")
    ctx, neg = _embed(assets, ["a cat runs", "static blurry"], 16).split(1)
    out = []
    for graph in (False, True):
        spec = SamplerSpec(kind="causal", causal=StreamSpec(times=[0.9, 0.6], frames_per_block=1, kv_dtype="float32",
                                                            guidance=2.0, cuda_graph=graph))
        s = _sampler(assets, spec, device="cuda")
        out.append(s.latent(ctx, neg[0], s.condition(None), seed=2))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


def _sampler(assets, spec, mode="t2v", dit="tiny", path=None, device="cpu"):
    from rcm_pipelines.components import CLIPSpec, DiTSpec, VAESpec

    return VideoPipeline(spec, VideoSpec(size=(32, 32), num_frames=5), mode=mode,
                       dit=DiTSpec(config=dit, path=str(path or assets.t2v)),
                       vae=VAESpec(path=str(assets.vae), arch=TINY_VAE),
                       clip=CLIPSpec(path=str(assets.clip), arch=TINY_CLIP), device=torch.device(device),
                       dtype=torch.float32, timer=StageTimer(verbose=False))


def test_teacher_and_causal_latents_match_direct_sampling(assets):
    ctx, neg = _embed(assets, ["a cat runs", "static blurry"], 16).split(1)
    net = _net(assets.t2v)
    # teacher: Euler + CFG 3.0 against the negative embedding (2 forwards per step)
    s = _sampler(assets, SamplerSpec(kind="euler", num_steps=3, guidance=3.0))
    got = s.latent(ctx, neg[0], s.condition(None), seed=5)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((1, 16, 2, 4, 4), generator=g)
    ref = flow_euler_sample(net, noise, ctx, neg, guidance=3.0, num_steps=3, shift=5.0, sigma_max=5000.0,
                            input_dtype=torch.float32)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)  # same float32 ops; rounding only
    # causal: 2 blocks of 1 latent frame, 2 steps each, fp32 cache of the whole video
    s = _sampler(assets, SamplerSpec(kind="causal", causal=StreamSpec(times=[0.9, 0.5], frames_per_block=1,
                                                                     kv_dtype="float32")))
    got = s.latent(ctx, None, s.condition(None), seed=9)
    layout = BlockLayout(1)
    cache = make_kv_cache(net, batch=1, height=4, width=4, layout=layout, window_frames=2, rolling=False,
                          kv_dtype="float32")
    blocks = stream_generate(net, ctx, cache, num_frames=2, layout=layout, latent_shape=(1, 16, 4, 4),
                             generator=torch.Generator().manual_seed(9), times=[0.9, 0.5])
    torch.testing.assert_close(got, torch.cat([b.x0 for b in blocks], dim=2), rtol=1e-5, atol=1e-5)
    assert got.abs().mean() > 0.05  # not a trivial all-zero latent


def test_i2v_plumbing(assets, tmp_path):
    images = tmp_path / "crop"
    images.mkdir()
    suite = [{"prompt_en": "a cat yawns", "dimension": ["i2v_subject"], "image_name": "cat.png"},
             {"prompt_en": "a cat yawns, camera pans left", "dimension": ["camera_motion"], "image_name": "cat.png"},
             {"prompt_en": "a calm lake", "dimension": ["i2v_background"], "image_name": "lake.png"}]
    (tmp_path / "i2v.json").write_text(json.dumps(suite))
    shutil.copy(assets.image, images / "cat.png")
    base = [*assets.component_flags(), f"--clip.path={assets.clip}", f"--clip.arch={json.dumps(TINY_CLIP)}",
            "--video.size=[32,32]", "--video.num_frames=5", "--device=cpu", "--stage=sample", "--suite=i2v",
            f"--prompt_file={tmp_path / 'i2v.json'}", f"--image_dir={images}", "--samples_per_prompt=1"]
    with pytest.raises(FileNotFoundError, match="lake.png"):
        eval_vbench.main([*base, f"--output_dir={tmp_path / 'x'}", "--dit.config=tiny-i2v", f"--dit.path={assets.i2v}"])
    shutil.copy(assets.image, images / "lake.png")
    res = eval_vbench.main([*base, f"--output_dir={tmp_path / 'bi'}", "--dit.config=tiny-i2v",
                            f"--dit.path={assets.i2v}", "--sampler.num_steps=1", "--dimensions=[\"i2v_subject\"]"])
    assert [p.name for p in res["sample"]["written"]] == ["a cat yawns-0.mp4"]
    res = eval_vbench.main([*base, f"--output_dir={tmp_path / 'causal'}", "--dit.config=tiny",
                            f"--dit.path={assets.t2v}", "--sampler.kind=causal", "--sampler.causal.times=[0.9]",
                            "--sampler.causal.frames_per_block=1", "--sampler.causal.kv_dtype=float32"])
    assert sorted(p.name for p in res["sample"]["written"]) == sorted(f"{e['prompt_en']}-0.mp4" for e in suite)
    assert read_video(res["sample"]["written"][0]).shape == (5, 32, 32, 3)
    with pytest.raises(ConfigError, match="needs image_dir"):
        resolve_config(eval_vbench.EvalVBenchConfig, ["--suite=i2v"])
    with pytest.raises(ConfigError, match=r"unknown t2v dimension\(s\) \['camera_motion'\]"):
        resolve_config(eval_vbench.EvalVBenchConfig, ['--dimensions=["camera_motion"]'])


_FAKE_VBENCH = '''
"""Stand-in for the vbench API the worker uses: VBench(device, full_info, output_path).evaluate(...) writes
{name}_eval_results.json = {dim: [fraction of the files vbench looks up ({prompt}-{i}.mp4, i < 5) that exist,
[]]} over the prompts of that dimension."""
import json, os

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.info, self.out = full_info_dir, output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, dimension_list=None, local=False, mode="vbench_standard", **kwargs):
        assert mode == "vbench_standard" and kwargs["imaging_quality_preprocessing_mode"] == "longer"
        if "scene" in dimension_list:  # what vbench does offline: its model download (wget) fails
            import subprocess
            raise subprocess.CalledProcessError(4, ["wget", "https://example.invalid/tag2text.pth"])
        names = set(os.listdir(videos_path))
        res = {}
        for dim in dimension_list:
            want = [f"{p['prompt_en']}-{i}.mp4" for p in json.load(open(self.info)) if dim in p["dimension"]
                    for i in range(5)]
            res[dim] = [sum(w in names for w in want) / len(want), []]
        json.dump(res, open(os.path.join(self.out, name + "_eval_results.json"), "w"))
'''


def test_score_and_report_stages(assets, suite_file, tmp_path, monkeypatch):
    out = tmp_path / "student"
    eval_vbench.main(_args(assets, suite_file, out))
    # without vbench: a readable error naming what to install and where its models go
    with pytest.raises(VBenchUnavailableError, match=r"(?s)pip install .*vbench==0\.1\.5.*~/\.cache/vbench"):
        eval_vbench.main(_args(assets, suite_file, out, "--stage=score", f"--score.python={sys.executable}"))
    fake = tmp_path / "fake_site"
    (fake / "vbench").mkdir(parents=True)
    (fake / "vbench" / "__init__.py").write_text(textwrap.dedent(_FAKE_VBENCH))
    (fake / "vbench" / "distributed.py").write_text(
        "def dist_init():\n    raise RuntimeError('inherited a torchrun world')\n\ndef get_rank():\n    return 0\n")
    (fake / "vbench-0.0.0.dist-info").mkdir()
    (fake / "vbench-0.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vbench\nVersion: 0.0.0\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("WORLD_SIZE", "1")  # as inside torchrun: the worker must not inherit it (checked below)
    # no --prompt_file: the suite file is found inside the vbench package of score.python's environment
    (fake / "vbench" / "VBench_full_info.json").write_text(json.dumps(SUITE[:1]))
    cfg = resolve_config(eval_vbench.EvalVBenchConfig, [f"--score.python={sys.executable}"])
    assert resolve_prompt_file(cfg.suite, cfg.prompt_file, cfg.score.python) == fake / "vbench" / "VBench_full_info.json"
    dims = '--score.dimensions=["subject_consistency","color"]'
    # the teacher's output folder as the score stage leaves it (vbench's files); the student: 2 of the 5 files
    # vbench looks up per prompt exist -> 0.4
    teacher = tmp_path / "teacher"
    (teacher / "vbench_results").mkdir(parents=True)
    (teacher / "vbench_results" / "color_eval_results.json").write_text(json.dumps({"color": [0.2, []]}))
    (teacher / "vbench_results" / "subject_consistency_eval_results.json").write_text(
        json.dumps({"subject_consistency": [0.2, []]}))
    res = eval_vbench.main(_args(assets, suite_file, out, "--stage=score", dims, f"--baseline={teacher}"))
    scores, base = res["report"]["scores"], res["report"]["baseline"]
    assert scores.raw == {"subject_consistency": 0.4, "color": 0.4} and base.raw["color"] == 0.2
    data = json.loads((out / "vbench_scores.json").read_text())
    assert data["delta"]["subject_consistency"] == pytest.approx(0.2) and data["scores"]["groups"]["total"] is None
    assert data["harness"]["seed_rule"] == "seed + 1000 * prompt_index + sample"
    assert (out / "vbench_scores.png").is_file() and "+20.00" in (out / "vbench_scores.txt").read_text()
    assert (out / "vbench_results" / "vbench.log").is_file()
    # offline: the error says that vbench downloads its models and where; finished dimensions stay
    with pytest.raises(VBenchRunError, match=r"(?s)model download that failed.*~/\.cache/vbench"):
        eval_vbench.main(_args(assets, suite_file, out, "--stage=score", '--score.dimensions=["color","scene"]'))
    assert (out / "vbench_results" / "color_eval_results.json").is_file()
