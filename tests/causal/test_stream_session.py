"""StreamSession: decode overlap (same frames, in order), batches of prompts written progressively, the
profiler trace, and recipes/stream.py's options (several prompts, CFG, bad values rejected before loading)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rcm_nets.wan import WanVAE
from rcm_nets.wan.vae import StreamingDecoder
from rcm_pipelines.components import DiTSpec, VAESpec
from rcm_pipelines.stream_session import StreamSession, decode_blocks
from rcm_pipelines.stream_spec import StreamSpec
from rcm_pipelines.streaming import StreamBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: more threads only add contention


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(2)
    return WanVAE(dim=4).eval()


def _blocks(latent):
    """Stub stream: blocks [1, 2, 2] latent frames of ``latent [B, 16, 5, h, w]``."""
    starts = [0, 1, 3, 5]
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        yield StreamBlock(i, a, latent[:, :, a:b], seconds=0.0)


@pytest.mark.slow
def test_decode_overlap_equals_sequential_cpu(vae):
    """Same code path with the overlap on and off (CPU: it runs sequentially, handing block n out after block
    n + 1 is made): identical frames, in order, and together == vae.decode of the whole latent (1e-5, float32
    summation order; a misordered or dropped block would be O(1) off or change the frame count 1 + 4·4)."""
    latent = torch.randn(2, 16, 5, 2, 2)
    on = list(decode_blocks(_blocks(latent), StreamingDecoder(vae), overlap=True))
    off = list(decode_blocks(_blocks(latent), StreamingDecoder(vae), overlap=False))
    assert [d.index for d in on] == [0, 1, 2] and [d.frames.shape[2] for d in on] == [1, 8, 8]
    for a, b in zip(on, off):
        assert torch.equal(a.frames, b.frames)
    with torch.no_grad():
        ref = vae.decode(latent)
    torch.testing.assert_close(torch.cat([d.frames for d in on], 2), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_decode_overlap_hands_block_out_after_the_next_is_made(vae):
    """The overlap's order of work: block n >= 1 is yielded only after block n + 1 was pulled from the generator
    (that is when its decode overlaps the DiT); block 0 at once; without overlap every block at once."""
    latent = torch.randn(1, 16, 5, 2, 2)
    for overlap in (True, False):
        pulled = []

        def gen(pulled=pulled):
            for blk in _blocks(latent):
                pulled.append(blk.index)
                yield blk

        for d in decode_blocks(gen(), StreamingDecoder(vae), overlap=overlap):
            lag = 1 if overlap and d.index > 0 else 0
            assert pulled[-1] == min(d.index + lag, 2)


def _session(tmp_path, device="cpu", decode=None, **spec):
    torch.manual_seed(0)
    save_file(WanVAE(dim=4).state_dict(), tmp_path / "vae.safetensors")
    spec = StreamSpec(**{**dict(frames_per_block=2, first_block_frames=1, times=[0.8], kv_dtype="float32"), **spec})
    return StreamSession(spec, dit=DiTSpec(config="tiny", path="random", overrides={"num_layers": 1}),
                         vae=VAESpec(path=str(tmp_path / "vae.safetensors"), arch={"dim": 4}),
                         device=torch.device(device), dtype=torch.float32, decode=decode)


@pytest.mark.slow
def test_session_writes_one_mp4_per_prompt(tmp_path):
    """Two prompts, one batch: two mp4s of 1 + 8 frames (blocks [1, 2] latents), one timing row per block."""
    from rcm_pipelines.video import read_video

    session = _session(tmp_path)
    paths = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    rows = session.write(paths, torch.randn(2, 4, 32), size=(16, 16), num_frames=9, seeds=[0, 1], log=lambda s: None)
    assert [r["frames"] for r in rows] == [1, 8] and all(r["dit_s"] > 0 for r in rows)
    videos = [read_video(p) for p in paths]
    assert all(v.shape == (9, 16, 16, 3) for v in videos)
    assert abs(videos[0].astype(float) - videos[1].astype(float)).mean() > 1  # different prompts and seeds


@pytest.mark.parametrize("options", [
    dict(kv_dtype="int4", group_size=16, extrapolation="rolling_sink", sink_bank_frames=3, sink_frames=1),
    dict(kv_dtype="int8", key_smoothing="first_block", extrapolation="infinity_rope", trained_frames=4),
])
def test_session_passes_cache_options(tmp_path, options):
    """The spec's storage / extrapolation settings reach the KV cache the session builds (and it streams)."""
    session = _session(tmp_path, **options)
    blocks = list(session.blocks(torch.randn(1, 4, 32), size=(16, 16), num_frames=13, seeds=[0]))
    assert len(blocks) == 3 and all(torch.isfinite(b.x0).all() for b in blocks)
    cache = session.caches[0]
    assert (cache.kv_dtype, cache.extrapolation) == (options["kv_dtype"], options["extrapolation"])
    if "sink_bank_frames" in options:
        assert cache.sink_bank_frames == 3 and cache.int4_group == 16
    else:
        assert cache.key_smoothing == "first_block" and cache.trained_frames == 4


@pytest.mark.slow
def test_session_decode_options_reach_the_decoder(tmp_path, monkeypatch):
    """VAEDecodeOptions given to the session are the streaming decoder's (block_step: a block's latent frames
    in one decoder step), and the frames match the reference decode's (float32, other kernel sizes: 1e-4);
    the default options mean the reference decode (no options passed)."""
    from rcm_nets.wan.vae_fast import VAEDecodeOptions
    from rcm_pipelines import stream_session

    seen = []

    class Recording(StreamingDecoder):
        def __init__(self, vae, options=None, **kw):
            seen.append(options)
            super().__init__(vae, options, **kw)

    monkeypatch.setattr(stream_session, "StreamingDecoder", Recording)
    kw = dict(size=(16, 16), num_frames=9, seeds=[0])
    ctx = torch.randn(1, 4, 32)
    ref = torch.cat([d.frames for d in _session(tmp_path, decode=VAEDecodeOptions()).frames(ctx, **kw)], 2)
    opts = VAEDecodeOptions(block_step=True)
    got = torch.cat([d.frames for d in _session(tmp_path, decode=opts).frames(ctx, **kw)], 2)
    assert seen == [None, opts]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_session_overlap_equals_sequential_gpu(tmp_path, monkeypatch):
    """CUDA: decode on the side stream while the DiT makes the next block == decode right after each block,
    frame for frame (same kernels on another stream; 1e-5), in order; times come from CUDA events, and the
    overlapped run never calls torch.cuda.synchronize (it waits on events only)."""
    session = _session(tmp_path, "cuda")
    kw = dict(size=(32, 32), num_frames=25, seeds=[0, 1])
    ctx = torch.randn(2, 4, 32)
    syncs = []
    real_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (syncs.append(1), real_sync(*a, **k))[1])
    on = list(session.frames(ctx, overlap=True, **kw))
    assert syncs == []
    off = list(session.frames(ctx, overlap=False, **kw))
    assert len(syncs) > 0  # the sequential path times blocks with device syncs: the counter works
    assert [d.index for d in on] == list(range(len(off)))
    for a, b in zip(on, off):
        torch.testing.assert_close(a.frames, b.frames, atol=1e-5, rtol=0)
        assert a.dit_s > 0 and a.decode_s > 0


# ------------------------------------------------------------------------------------------ recipe
def _recipe(tmp_path, *extra):
    import stream

    out = tmp_path / "out"
    argv = ["--video.size=[16,16]", "--stream.frames_per_block=2", "--stream.times=[0.8]",
            "--stream.trained_frames=6", "--video.num_frames=4", f"--out_dir={out}", "--stream.kv_dtype=float32",
            '--dit.overrides={"num_layers": 1}', *extra]
    return stream.main(argv), out


@pytest.mark.slow
def test_recipe_two_prompts_cfg_profile(tmp_path):
    """Two prompts in one batch with CFG (guidance 2, empty negative prompt) and --profile: two mp4s of 4
    frames, timings, and a chrome trace (JSON with traceEvents) next to them."""
    from rcm_pipelines.video import read_video

    summary, out = _recipe(tmp_path, '--prompts=["a red square moving right", "a blue disk moving left"]',
                           "--stream.guidance=2", "--stream.negative_prompt=", "--profile=true")
    assert [read_video(out / f"video_00{i}.mp4").shape for i in range(2)] == [(4, 16, 16, 3)] * 2
    assert summary["prompts"] == 2 and summary["blocks"] == 2
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["traceEvents"]) > 10


@pytest.mark.parametrize("flag, field", [
    ("--stream.times=[0.5,0.9]", "stream.times"), ("--stream.context_noise=1.5", "stream.context_noise"),
    ("--stream.guidance=0.5", "stream.guidance"), ("--stream.refresh=sometimes", "stream.refresh"),
    ("--stream.euler_steps=50", "euler_steps"), ("--video.size=null", "video.size"),
    ("--image=x.png", "first_block_frames=1"), ("--dit.config=tiny-i2v-A14B", "I2V network"),
    ("--stream.guidance=3", "stream.negative_prompt=''"),
])
def test_recipe_rejects_bad_values_before_loading(tmp_path, capsys, flag, field):
    """A bad value is one error line naming the field, raised before anything loads (the DiT path does not
    exist, so reaching the loader would report that file instead)."""
    import stream

    with pytest.raises(SystemExit):
        stream.run_main(lambda: stream.main([flag, "--dit.path=/nonexistent/dit.pt", f"--out_dir={tmp_path}"]))
    err = capsys.readouterr().err
    assert field in err and "does not exist" not in err and not (tmp_path / "config.yaml").exists()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny DiT / VAE / umT5 / tokenizer files in the official formats (``rcm_pipelines.testing``)."""
    from rcm_pipelines.testing import write_tiny_assets

    return write_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.mark.slow
def test_recipe_real_loading_umt5_cfg(tmp_path, assets):
    """The real loading path: DiT weights from a file (components.load_dit), the VAE from its file, prompts and
    the negative prompt through the tiny umT5 + tokenizer, CFG 2: blocks [1, 2] latents give 1 + 8 frames."""
    from rcm_pipelines.testing import TINY_VAE
    from rcm_pipelines.video import read_video

    summary, out = _recipe(tmp_path, "--dit.config=tiny", "--dit.overrides={}", f"--dit.path={assets.t2v}",
                           f"--vae.path={assets.vae}",
                           f"--vae.arch={json.dumps(TINY_VAE)}", "--text_encoder=umt5", f"--umt5.path={assets.t5}",
                           f"--umt5.tokenizer={assets.tokenizer}", f"--umt5.arch={json.dumps(assets.t5_arch)}",
                           "--stream.first_block_frames=1", "--video.num_frames=9", "--stream.guidance=2",
                           "--stream.negative_prompt=birds flying", "--prompts=[\"a cat walks on the grass\"]")
    assert read_video(out / "video.mp4").shape == (9, 16, 16, 3) and summary["blocks"] == 2
    assert summary["cache_mib"] > 0
