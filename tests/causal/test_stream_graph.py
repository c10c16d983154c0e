"""CUDA graphs of the streaming DiT step (``stream_generate(cuda_graph=...)``, ``StepGraphs``) and the sync-free
cache bookkeeping they rely on (``KVCache.use_static_indices``).

The reference everywhere is the plain eager path (the cache's default bookkeeping: fresh index tensors per
block, slice writes), run on the same tiny net: 9 blocks of 2 frames, sink 2 + window 4 frames, so the visible
cache length goes 0, 2, 4, 6 and then stays 6 while the ring of slots wraps around."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.kv_cache import KVCache
from rcm_nets.wan import WanDiT, WanVAE
from rcm_nets.wan.causal import make_kv_cache
from rcm_pipelines.components import DiTSpec, VAESpec
from rcm_pipelines.stream_session import StreamSession
from rcm_pipelines.stream_spec import StreamSpec
from rcm_pipelines.streaming import StepGraphs, stream_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: more threads only add contention

LAYOUT = BlockLayout(2)
BLOCKS = 9


def _net(device, dtype=torch.float32):
    torch.manual_seed(0)
    net = WanDiT.from_config("tiny", num_layers=2, device=device, dtype=dtype).eval().requires_grad_(False)
    net.init_weights(generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():  # a non-zero head, so the velocity (and the cache it feeds) is not trivially 0
        net.head.head.weight.normal_(std=net.config.dim**-0.5, generator=torch.Generator(device=device).manual_seed(1))
    return net


def _caches(net, device, cfg, static=False, **opts):
    opts = {"kv_dtype": "float32", **opts}
    caches = [make_kv_cache(net, batch=1, height=4, width=4, layout=LAYOUT, window_frames=4, sink_frames=2,
                            device=device, **opts) for _ in range(1 + cfg)]
    if static:
        for kv in caches:
            kv.use_static_indices()
    return caches


def _run(net, caches, prompts, *, cuda_graph=False, refresh="clean", guidance=1.0, clean_refresh_blocks=0,
         synchronize=True):
    device = next(net.parameters()).device
    gen = torch.Generator(device=device).manual_seed(3)
    cfg = len(caches) == 2
    blocks = stream_generate(net, prompts[0], caches[0], num_frames=2 * BLOCKS, layout=LAYOUT,
                             latent_shape=(1, 16, 4, 4), generator=gen, times=(0.9, 0.6), refresh=refresh,
                             clean_refresh_blocks=clean_refresh_blocks, negative=prompts[1] if cfg else None,
                             uncond_cache=caches[1] if cfg else None, guidance=guidance, cuda_graph=cuda_graph,
                             synchronize=synchronize)
    return torch.cat([blk.x0 for blk in blocks], 2)


def _prompts(net, device, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(5)
    return [net.encode_prompt(torch.randn(1, 4, 32, device=device, generator=g, dtype=dtype)) for _ in range(2)]


CASES = [dict(), dict(refresh="last_step", clean_refresh_blocks=1, guidance=3.0), dict(guidance=2.0)]
FORMATS = [dict(kv_dtype="int8", key_smoothing="first_block"), dict(kv_dtype="fp8"), dict(kv_dtype="int4", group_size=4),
           dict(kv_dtype="float32", extrapolation="rolling_sink", sink_bank_frames=4)]


@pytest.mark.parametrize("case,cache_opts", [(c, {}) for c in CASES] + [(CASES[0], f) for f in FORMATS],
                         ids=["clean", "last_step+cfg", "clean+cfg", "int8-smoothed", "fp8", "int4",
                                                          "rolling_sink"])
def test_static_indices_equal_plain_cpu(case, cache_opts):
    """The sync-free bookkeeping for graphs (fixed index buffers updated in place, writes through a device
    slot index, index_copy_) gives exactly the plain path's video (float32, bitwise), for every refresh mode,
    with CFG, for quantized storage and a rolling sink; the buffers keep their addresses while the visible
    length goes 0, 2, 4, 6, 6, ..."""
    net = _net("cpu")
    prompts = _prompts(net, "cpu")
    cfg = case.get("guidance", 1.0) > 1
    ref = _run(net, _caches(net, "cpu", cfg, **cache_opts), prompts, **case)
    static = _caches(net, "cpu", cfg, static=True, **cache_opts)
    ptr = static[0].layer(0).frame_slots.untyped_storage().data_ptr()
    out = _run(net, static, prompts, **case)
    assert torch.equal(out, ref)
    assert static[0].layer(0).frame_slots.untyped_storage().data_ptr() == ptr and static[0].num_cached_frames >= 6


def test_static_indices_track_plain_bookkeeping_cpu():
    """Block by block, the static views hold what the plain cache allocates: visible slots, their positions and
    the block's positions (infinity_rope: positions recomputed at begin_block)."""
    kw = dict(batch=1, heads=1, head_dim=4, tokens_per_frame=2, window_frames=4, sink_frames=2,
              max_block_frames=2, keys_pre_rope=True, extrapolation="infinity_rope", trained_frames=7)
    plain, static = KVCache(2, **kw), KVCache(2, **kw)
    static.use_static_indices()
    k = torch.randn(1, 4, 1, 4)
    for _ in range(6):
        blocks = [c.begin_block(2) for c in (plain, static)]
        assert torch.equal(static.layer(0).frame_slots, plain.layer(0).frame_slots)
        assert torch.equal(static.frame_positions(), plain.frame_positions())
        assert static.block_positions(blocks[1]).tolist() == list(blocks[0].positions)
        for c, blk in zip((plain, static), blocks):
            for i in range(2):
                c.write(i, blk, k, k)
            c.commit(blk)
    assert torch.equal(static.storage()[0], plain.storage()[0])


def test_mark_written_checks_block():
    c = KVCache(1, batch=1, heads=1, head_dim=4, tokens_per_frame=2, window_frames=4, max_block_frames=2,
                kv_dtype="int8")
    blk = c.begin_block(2)
    with pytest.raises(RuntimeError, match="not written for layers"):
        c.commit(blk)
    c.mark_written(blk)
    c.commit(blk)
    with pytest.raises(RuntimeError, match="not the pending block"):
        c.mark_written(blk)


def test_cuda_graph_falls_back_on_cpu(caplog):
    """cuda_graph=True on the CPU: the eager video exactly, no capture, the reason logged once for 9 blocks."""
    net = _net("cpu")
    prompts = _prompts(net, "cpu")
    ref = _run(net, _caches(net, "cpu", True), prompts, guidance=2.0)
    graphs = StepGraphs(net)
    with caplog.at_level(logging.WARNING, logger="rcm_pipelines.streaming"):
        out = _run(net, _caches(net, "cpu", True), prompts, guidance=2.0, cuda_graph=graphs)
        out2 = _run(net, _caches(net, "cpu", True), prompts, guidance=2.0, cuda_graph=graphs)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    msgs = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert len(msgs) == 1 and "CUDA device" in msgs[0], msgs
    assert graphs.captures == graphs.replays == 0


def test_unsupported_reasons():
    """Graphs need CUDA, the cache on the net's device and no autograd."""
    net = _net("cpu")
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert "CUDA device" in StepGraphs.unsupported(cpu, _caches(net, "cpu", False, kv_dtype="int8"))
        assert "not on the net's device" in StepGraphs.unsupported(torch.device("cuda"), _caches(net, "cpu", False))
    assert "CUDA device" in StepGraphs.unsupported(cpu, _caches(net, "cpu", False))


def test_spec_option():
    assert StreamSpec().cuda_graph is False and StreamSpec(cuda_graph=True).cuda_graph is True
    with pytest.raises(ValueError, match="cuda_graph"):
        StreamSpec(cuda_graph="maybe")


GPU_CASES = [(torch.float32, dict(), {}), (torch.float32, dict(refresh="last_step", clean_refresh_blocks=1,
                                                                 guidance=3.0), {}),
             (torch.float32, dict(guidance=2.0), dict(extrapolation="infinity_rope", trained_frames=8)),
             (torch.bfloat16, dict(guidance=2.0), {}),
             (torch.bfloat16, dict(), dict(kv_dtype="int8", key_smoothing="first_block")),
             (torch.bfloat16, dict(), dict(kv_dtype="fp8")),
             (torch.bfloat16, dict(refresh="last_step"), dict(kv_dtype="int4", group_size=4))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,case,cache_opts", GPU_CASES, ids=["fp32-clean", "fp32-last_step+cfg",
                                                                   "fp32-infinity_rope+cfg", "bf16-cfg", "bf16-int8-smoothed",
                                                                   "bf16-fp8", "bf16-int4-last_step"])
def test_graph_equals_eager_gpu(dtype, case, cache_opts):
    """Graph replay == eager over 9 blocks (window filled and rolled, the ring wrapped), three videos with one
    StepGraphs (the first two mix eager warm-up, capture and replay; the third replays every DiT call), and
    the caches end equal. Bounds: float32 1e-5; bf16 2e-2 absolute on unit-scale latents (the same kernels run, so the
    expected difference is 0; the bound only allows for a library picking another algorithm under capture)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net = _net("cuda", dtype)
    prompts = _prompts(net, "cuda", dtype)
    cfg = case.get("guidance", 1.0) > 1
    cache_opts = {"kv_dtype": "float32" if dtype == torch.float32 else "bfloat16", **cache_opts}
    eager_caches = _caches(net, "cuda", cfg, **cache_opts)
    ref = _run(net, eager_caches, prompts, **case)
    graphs = StepGraphs(net)
    caches = _caches(net, "cuda", cfg, **cache_opts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for video in range(3):
        replays = graphs.replays
        out = _run(net, caches, prompts, cuda_graph=graphs, **case)
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)
        if video == 1:
            shapes = graphs.captures
    # every shape is captured by the end of the second video; the third only replays (every DiT call)
    clean = [case.get("refresh", "clean") == "clean" or i < case.get("clean_refresh_blocks", 0) for i in range(BLOCKS)]
    calls = (1 + cfg) * sum(2 + c for c in clean)  # 2 steps (+ the clean refresh pass) per block and branch
    assert graphs.off_reason is None and graphs.captures == shapes == len(graphs._graphs) > 0
    assert graphs.replays - replays == calls
    for a, b in zip(caches, eager_caches):
        torch.testing.assert_close(a.storage()[0].float(), b.storage()[0].float(), atol=tol, rtol=0)


@pytest.mark.gpu
def test_no_host_sync_per_block_gpu():
    """Neither the eager blocks nor the graph replays make a synchronizing CUDA call (cache bookkeeping via
    pinned non-blocking copies, block positions from the cache): ``torch.cuda.set_sync_debug_mode("error")``
    raises on one (a blocking H2D copy, ``.item()``, ``nonzero``, a stream or device sync). CFG, 9 blocks,
    ``synchronize=False`` (CUDA-event timing); shapes are captured before the checked runs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net = _net("cuda")
    prompts = _prompts(net, "cuda")
    graphs = StepGraphs(net)
    caches, eager = _caches(net, "cuda", True), _caches(net, "cuda", True)
    for _ in range(2):
        _run(net, caches, prompts, cuda_graph=graphs, guidance=2.0)
    _run(net, eager, prompts, guidance=2.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = _run(net, eager, prompts, guidance=2.0, synchronize=False)
        b = _run(net, caches, prompts, cuda_graph=graphs, guidance=2.0, synchronize=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_session_cuda_graph_cpu(tmp_path):
    """StreamSession with spec.cuda_graph on the CPU: the same latents as without (eager fallback, bitwise),
    video after video, and it keeps its caches across videos of one geometry (graphs bind to their storage)."""
    save_file(WanVAE(dim=4).state_dict(), tmp_path / "vae.safetensors")

    def session(**kw):
        spec = StreamSpec(frames_per_block=2, first_block_frames=1, times=[0.8], kv_dtype="float32", **kw)
        return StreamSession(spec, dit=DiTSpec(config="tiny", path="random", overrides={"num_layers": 1}),
                             vae=VAESpec(path=str(tmp_path / "vae.safetensors"), arch={"dim": 4}),
                             device=torch.device("cpu"), dtype=torch.float32)

    ctx = torch.randn(1, 4, 32)
    kw = dict(size=(16, 16), num_frames=13, seeds=[0])
    ref = torch.cat([b.x0 for b in session().blocks(ctx, **kw)], 2)
    s = session(cuda_graph=True)
    first = torch.cat([b.x0 for b in s.blocks(ctx, **kw)], 2)
    caches = list(s.caches)
    second = torch.cat([b.x0 for b in s.blocks(ctx, **kw)], 2)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert s.caches == caches and s.graphs is not None and s.graphs.captures == 0


@pytest.mark.gpu
def test_session_cuda_graph_gpu(tmp_path):
    """StreamSession on CUDA with spec.cuda_graph (float32, decode overlap on): three videos give the latents of
    a session without graphs (1e-5), and the third replays (no new capture)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    save_file(WanVAE(dim=4).state_dict(), tmp_path / "vae.safetensors")

    def session(**kw):
        spec = StreamSpec(frames_per_block=2, first_block_frames=1, times=[0.8, 0.5], kv_dtype="float32",
                          trained_frames=6, **kw)
        return StreamSession(spec, dit=DiTSpec(config="tiny", path="random", overrides={"num_layers": 2}),
                             vae=VAESpec(path=str(tmp_path / "vae.safetensors"), arch={"dim": 4}),
                             device=torch.device("cuda"), dtype=torch.float32)

    ctx = torch.randn(1, 4, 32)
    kw = dict(size=(16, 16), num_frames=29, seeds=[0])
    ref = torch.cat([d.frames for d in session().frames(ctx, **kw)], 2)
    s = session(cuda_graph=True)
    for _ in range(3):
        captures = s.graphs.captures
        out = torch.cat([d.frames for d in s.frames(ctx, **kw)], 2)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert s.graphs.captures == captures > 0 and s.graphs.replays > 0
