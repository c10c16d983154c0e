"""Streaming: VAE block decode, constant memory with a rolling cache, and the stream.py recipe end to end."""

import gc
import json

import numpy as np
import pytest
import torch

from rcm_kernels.blockmask import BlockLayout
from rcm_nets.wan import WanDiT, WanVAE
from rcm_nets.wan.causal import make_kv_cache
from rcm_nets.wan.vae import StreamingDecoder
from rcm_pipelines.streaming import stream_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: more threads only add contention


def test_streaming_decoder_equals_whole_decode():
    """Blocks [1, 2] decoded as they arrive == vae.decode of the 3-frame latent (same per-frame causal cache;
    float32, only summation order may differ: 1e-5). Frame counts: 1 + 4(n-1) for the first block, then 4n."""
    torch.manual_seed(2)
    vae = WanVAE(dim=4).eval()
    latent = torch.randn(1, 16, 3, 2, 2)
    dec = StreamingDecoder(vae)
    parts = [dec(latent[:, :, :1]), dec(latent[:, :, 1:])]
    assert [p.shape[2] for p in parts] == [1, 8]
    with torch.no_grad():
        ref = vae.decode(latent)
    torch.testing.assert_close(torch.cat(parts, 2), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # without the cache of frame 0 the last frames differ: the cache matters
        fresh = vae.decode(latent[:, :, 1:])
    assert (parts[1][:, :, 4:] - fresh[:, :, 1:]).abs().max() > 1e-3


def _live_tensor_bytes() -> int:
    """Bytes of every distinct live tensor storage (CPU: what the process holds in tensors)."""
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and not obj.is_meta:
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _tiny_stream(device="cpu", kv_dtype="int8"):
    torch.manual_seed(0)
    net = WanDiT.from_config("tiny", num_layers=1, device=device).eval()
    net.init_weights()
    layout = BlockLayout(2)
    cache = make_kv_cache(net, batch=1, height=4, width=4, layout=layout, window_frames=4, sink_frames=2,
                          kv_dtype=kv_dtype, device=device)
    prompt = net.encode_prompt(torch.randn(1, 4, 32, device=device))
    gen = torch.Generator(device=device).manual_seed(0)
    blocks = stream_generate(net, prompt, cache, num_frames=2 * 9, layout=layout, latent_shape=(1, 16, 4, 4),
                             generator=gen, times=(0.7,))
    return cache, blocks


def test_memory_constant_once_window_full():
    """9 blocks of 2 frames, sink 2 + window 4 frames: from block 3 on (window full) the cache's bytes, its
    storage addresses, the frames attention reads and all live tensor bytes of the process stay constant."""
    cache, blocks = _tiny_stream()
    storage0 = [t.data_ptr() for t in cache.storage()]
    bytes0 = cache.nbytes()
    live, visible = [], []
    for i, blk in enumerate(blocks):
        visible.append(cache.num_cached_frames)
        del blk
        if i in (3, 5, 8):  # a gc sweep per sample: a few suffice
            live.append(_live_tensor_bytes())
        assert cache.nbytes() == bytes0 and [t.data_ptr() for t in cache.storage()] == storage0
    assert visible == [2, 4, 6, 6, 6, 6, 6, 6, 6]
    assert len(set(live)) == 1, live


@pytest.mark.gpu
def test_peak_memory_constant_gpu():
    """On CUDA: peak allocated memory per block is the same for every block once the window is full."""
    cache, blocks = _tiny_stream(device="cuda")
    peaks = []
    for blk in blocks:
        del blk
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    assert len(set(peaks[3:])) == 1, peaks


def _run_recipe(tmp_path, *extra):
    import stream

    out = tmp_path / "out"
    argv = ["--video.size=[16,16]", "--stream.frames_per_block=2", "--stream.times=[0.8]", "--stream.trained_frames=6",
            "--video.num_frames=8", f"--out_dir={out}", "--stream.kv_dtype=int8", *extra]
    return stream.main(argv), out


def test_stream_recipe_t2v_writes_readable_mp4(tmp_path, capsys):
    """tiny-pixel model, 4 blocks of 2 frames, rolling cache (sink 2 + window 2 frames < 8): the mp4 reads
    back with 8 frames of 16x16; timings and the resolved config are written, the table is printed."""
    from rcm_pipelines.video import read_video

    summary, out = _run_recipe(tmp_path)
    frames = read_video(out / "video.mp4")
    assert frames.shape == (8, 16, 16, 3)
    data = json.loads((out / "timings.json").read_text())
    assert len(data["blocks"]) == 4 and summary["frames"] == 8 and summary["steady_fps"] > 0
    assert (out / "config.yaml").is_file()
    text = capsys.readouterr().out
    assert "time to first block" in text and "frames/s" in text and "block    3" in text


def test_stream_recipe_i2v_first_frame_is_the_image(tmp_path):
    """Causal I2V in pixel space: the first frame of the video is the given image (up to H.264 loss)."""
    import imageio.v3 as iio

    from rcm_pipelines.video import read_video

    yy, xx = np.mgrid[0:16, 0:16]
    img = np.stack([xx * 15, yy * 15, np.full_like(xx, 128)], -1).astype(np.uint8)  # smooth: codec-friendly
    iio.imwrite(tmp_path / "first.png", img)
    summary, out = _run_recipe(tmp_path, f"--image={tmp_path / 'first.png'}", "--stream.first_block_frames=1")
    frames = read_video(out / "video.mp4")
    assert frames.shape[0] == 9 and summary["frames"] == 9  # 1 given + 4 blocks of 2
    assert np.abs(frames[0].astype(float) - img).mean() < 8


def test_stream_recipe_with_vae(tmp_path):
    """Latent model + Wan VAE (a dim-4 VAE checkpoint): blocks [1, 2] latent frames decode to 1 + 8 = 9
    frames of 16x16 (latent 2x2), appended as they come."""
    from safetensors.torch import save_file

    from rcm_pipelines.video import read_video

    torch.manual_seed(0)
    save_file(WanVAE(dim=4).state_dict(), tmp_path / "vae.safetensors")
    summary, out = _run_recipe(tmp_path, "--dit.config=tiny", f"--vae.path={tmp_path / 'vae.safetensors'}",
                               '--vae.arch={"dim": 4}', "--stream.first_block_frames=1", "--video.num_frames=9")
    assert read_video(out / "video.mp4").shape == (9, 16, 16, 3) and summary["blocks"] == 2
    rows = json.loads((out / "timings.json").read_text())["blocks"]
    assert [r["frames"] for r in rows] == [1, 8] and all(r["decode_s"] > 0 for r in rows)


def test_stream_recipe_bad_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run_recipe(tmp_path, "--image=x.png")  # I2V needs a first block of one frame
    assert "first_block_frames=1" in capsys.readouterr().err
