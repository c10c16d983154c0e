"""Fast streaming VAE decode (``rcm_nets.wan.vae_fast``): every option against the reference decode.

References: the official goldens (float32, tolerance 1e-4 as in test_vae.py), the reference decode of this
package (``WanVAE.decode`` / ``StreamingDecoder`` without options), the whole-sequence decode in float64 (an
independent path: no feature cache), and the plain ``RMSNorm`` + ``SiLU`` modules for the fused norm.
Tolerances, float32: the fused norm in plain torch runs the reference's operations in the reference's order,
so it is bit-identical (atol 0); channels-last convolutions, the Triton kernel, padding inside the conv and
whole-block steps may sum in another order, so they get a float32-rounding bound (measured ≤ 3.5e-6 on the
golden, outputs O(1); bound 1e-5, while a wrong cache, chunking or norm axis is O(0.1)). GPU tests (``gpu``
marker) state their bounds in place.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _golden import golden_names, load_golden
from pydantic import ValidationError
from test_vae import _golden_vae, _tiny  # the same golden loader and tiny random VAE

from rcm_nets.wan import WanVAE
from rcm_nets.wan._vae_blocks import RMSNorm
from rcm_nets.wan.vae import StreamingDecoder, VAEDecodeOptions
from rcm_nets.wan.vae_fast import (
    FastDecode,
    FusedRMSNormSiLU,
    cudnn_benchmark,
    fuse_norm_silu,
    release_fast_decode,
    rms_norm_silu,
    rms_norm_silu_triton,
)

CL = torch.channels_last_3d
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: more threads only add contention


def _norm(c: int, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(c)
    with torch.no_grad():
        norm.gamma.copy_(1 + 0.1 * torch.randn(norm.gamma.shape, generator=torch.Generator().manual_seed(seed)))
    return norm


def _stream(dec: StreamingDecoder, latent: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Decode ``latent`` in consecutive blocks of ``sizes`` latent frames and concatenate the frames."""
    assert sum(sizes) == latent.shape[2]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return torch.cat([dec(latent[:, :, s : s + n]) for s, n in zip(starts, sizes)], dim=2)


# ------------------------------------------------------------------------------------------ fused norm
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [True, False])
def test_fused_norm_torch_twin_is_the_reference_modules(channels_last, silu):
    """float32: the twin runs RMSNorm's operations in its order: bit-identical (atol 0)."""
    norm = _norm(12)
    x = torch.randn(2, 12, 3, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    ref = F.silu(norm(x)) if silu else norm(x)
    torch.testing.assert_close(rms_norm_silu(x, norm.gamma, norm.scale, silu), ref, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(2, 12, 3, 5, 7), (1, 33, 2, 4, 6), (1, 5, 1, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_norm_triton_matches_twin(shape, channels_last):
    """Triton kernel (CPU interpreter, float32) vs the plain-torch twin: channel counts that are not powers of
    two, positions not a multiple of the tile, batch > 1, both memory formats (strided loads); the output
    keeps the input's strides. Bound 1e-6 (sum order and sigmoid rounding; measured ≤ 7e-7)."""
    norm = _norm(shape[1], seed=1)
    x = torch.randn(shape) * 3
    if channels_last:
        x = x.contiguous(memory_format=CL)
    for silu in (True, False):
        y = rms_norm_silu_triton(x, norm.gamma, norm.scale, silu)
        assert y.stride() == x.stride()
        torch.testing.assert_close(y, rms_norm_silu(x, norm.gamma, norm.scale, silu), atol=1e-6, rtol=1e-6)
    # a non-dense view (every other frame) is made dense first, not read with wrong strides
    xs, norm6 = torch.randn(1, 6, 4, 3, 3)[:, :, ::2], _norm(6)
    torch.testing.assert_close(rms_norm_silu_triton(xs, norm6.gamma, norm6.scale),
                               rms_norm_silu(xs, norm6.gamma, norm6.scale), atol=1e-6, rtol=1e-6)


def test_fuse_norm_silu_rewrites_only_norm_silu_pairs():
    """Every ResidualBlock norm (2 each) and the head become fused; the attention norm (no SiLU after it)
    stays; parameter names and values are unchanged, and the fused module shares ``gamma``."""
    vae = WanVAE(dim=4)
    sd = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    n_res = sum(type(m).__name__ == "ResidualBlock" for m in vae.decoder.modules())
    assert fuse_norm_silu(vae.decoder, "torch") == 2 * n_res + 1
    fused = [m for m in vae.decoder.modules() if isinstance(m, FusedRMSNormSiLU)]
    assert len(fused) == 2 * n_res + 1 and not any(isinstance(m, torch.nn.SiLU) for m in vae.decoder.modules())
    assert isinstance(vae.decoder.middle[1].norm, RMSNorm)
    new = vae.decoder.state_dict()
    assert list(new) == list(sd) and all(torch.equal(new[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------------ options
def test_options_defaults_and_validation():
    opt = VAEDecodeOptions()
    assert not opt.changes_modules and not opt.compile and not opt.cuda_graph and opt.dtype is None
    vae = WanVAE(dim=4)
    fast = FastDecode(vae, opt)  # the defaults run the VAE's own modules (no copy)
    assert fast.decoder is vae.decoder and fast.conv2 is vae.conv2
    with pytest.raises(ValidationError, match="fused_norm"):
        VAEDecodeOptions(fused_norm="cuda")
    with pytest.raises(ValidationError, match="extra"):
        VAEDecodeOptions(channel_last=True)
    with pytest.raises(ValidationError, match="dtype"):
        VAEDecodeOptions(dtype="float64x")
    with pytest.raises(ValueError, match="cuda_graph needs the VAE on a CUDA device"):
        StreamingDecoder(vae, VAEDecodeOptions(cuda_graph=True))  # vae on the CPU
    with pytest.raises(ValidationError, match="compile=True needs fused_norm"):
        VAEDecodeOptions(compile=True, fused_norm="triton")
    assert VAEDecodeOptions.fastest(cuda_graph=False).dtype == "bfloat16"
    assert VAEDecodeOptions.fastest(compile=True).fused_norm == "torch"


def test_fast_path_leaves_the_callers_vae_alone():
    """dtype / channels-last / fused norm / conv padding convert a private copy: the caller's modules, dtype, memory format
    and reference decode are unchanged afterwards."""
    vae = _tiny(torch.float32)
    z = torch.randn(1, 16, 2, 2, 2)
    with torch.no_grad():
        before = vae.decode(z, clamp=False)
    dec = StreamingDecoder(vae, VAEDecodeOptions(dtype="bfloat16", channels_last=True, fused_norm="torch",
                                                 conv_padding=True))
    dec(z)
    assert dec._fast.decoder.conv1.pad_in_conv
    assert dec._fast.decoder is not vae.decoder and dec._fast.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert vae.decoder.conv1.weight.is_contiguous() and not any(
        isinstance(m, FusedRMSNormSiLU) or getattr(m, "pad_in_conv", False) for m in vae.modules())
    assert dec._fast.decoder.conv1.weight.is_contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z, clamp=False), before, atol=0, rtol=0)


def test_cudnn_benchmark_is_scoped():
    prev = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with cudnn_benchmark(True):
            assert torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.benchmark
        with pytest.raises(RuntimeError), cudnn_benchmark(True):
            raise RuntimeError("restored even on error")
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = prev


# --------------------------------------------------------------------------------- decode vs reference
_GOLDEN_OPTIONS = [
    pytest.param(VAEDecodeOptions(), 0.0, id="defaults"),
    pytest.param(VAEDecodeOptions(channels_last=True), 1e-5, id="channels_last"),
    pytest.param(VAEDecodeOptions(fused_norm="torch"), 0.0, id="fused_torch"),
    pytest.param(VAEDecodeOptions(conv_padding=True), 1e-5, id="conv_padding"),
    pytest.param(VAEDecodeOptions(block_step=True), 1e-5, id="block_step"),
    pytest.param(VAEDecodeOptions(channels_last=True, fused_norm="torch", dtype="float32"), 1e-5, id="cl+fused"),
    pytest.param(VAEDecodeOptions(channels_last=True, fused_norm="triton"), 1e-5, id="cl+triton",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options, tol", _GOLDEN_OPTIONS)
@pytest.mark.parametrize("name", golden_names("WanVAE_"))
def test_fast_decode_matches_golden_and_reference(name, options, tol):
    """Streaming decode of the golden latents, frame by frame and in one block, with each fp32 option: the
    official golden within 1e-4 and the reference decode within ``tol`` (0 = bit-identical)."""
    g = load_golden(name)
    vae = _golden_vae(g)
    for case in g.meta["cases"]:
        latent, golden = g.io[case["latent_key"]], g.io[case["decoded_key"]]
        with torch.no_grad():
            ref = vae.decode(latent, clamp=False)
        n = latent.shape[2]
        for sizes in ([n], [1] * n):
            out = _stream(StreamingDecoder(vae, options, clamp=False), latent, sizes)
            torch.testing.assert_close(out, golden, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("options", [VAEDecodeOptions(channels_last=True, fused_norm="torch", conv_padding=True),
                                     VAEDecodeOptions(fused_norm="torch"), VAEDecodeOptions(block_step=True)],
                         ids=["cl+fused+pad", "fused", "block_step"])
def test_fast_multi_block_stream_equals_whole_video_decode(options):
    """7 latent frames in blocks [3, 2, 2] through the fast path (float64, past the steady-state switch at
    latent frame 3) == the whole-sequence decode without any cache (independent path), 1e-10; and a second
    stream with a fresh cache and other block sizes gives the same frames."""
    vae = _tiny(torch.float64)
    latent = torch.randn(1, 16, 7, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        whole = vae.decode(latent, clamp=False, chunked=False)
    fast, cache = FastDecode(vae, options), {}
    out = torch.cat([fast(latent[:, :, s:e], cache) for s, e in ((0, 3), (3, 5), (5, 7))], dim=2)
    assert out.shape == whole.shape == (1, 3, 25, 16, 24) and out.dtype == torch.float64
    torch.testing.assert_close(out, whole, atol=1e-10, rtol=1e-10)
    cache = {}  # a new stream, other block sizes
    again = torch.cat([fast(latent[:, :, s:e], cache) for s, e in ((0, 1), (1, 5), (5, 7))], dim=2)
    torch.testing.assert_close(again, out, atol=1e-10, rtol=1e-10)


def test_steady_state_step_plumbing(monkeypatch):
    """The steady-state step (the pure function of tensors that compile traces and a CUDA graph captures), run
    as plain Python (``torch.compile`` replaced by the identity): it takes over from latent frame 4 of the first
    stream (frame 3 is the first that leaves the cache shapes unchanged) and from frame 3 of the next (its
    signature is then known), with the cache passed as a tensor list and written back. Frames equal the
    reference decode bit for bit; one step is built for both streams."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    vae = _tiny(torch.float32)
    latent = torch.randn(1, 16, 7, 2, 3)
    ref = _stream(StreamingDecoder(vae, clamp=False), latent, [3, 2, 2])
    dec = StreamingDecoder(vae, VAEDecodeOptions(compile=True, fused_norm="torch"), clamp=False)
    calls = []
    steady = FastDecode._steady_step
    monkeypatch.setattr(FastDecode, "_steady_step", lambda self, *a: calls.append(1) or steady(self, *a))
    for expected in (3, 4):
        calls.clear()
        dec.reset()
        torch.testing.assert_close(_stream(dec, latent, [3, 2, 2]), ref, atol=0, rtol=0)
        assert len(calls) == expected
    assert len(dec._fast._steps) == 1
    # block_step: steps [0], [1, 2], [3, 4] (leaves the shapes unchanged), then [5, 6] steady; later videos from
    # [3, 4] on. Summation order may differ with the step's frame count (1e-5).
    dec = StreamingDecoder(vae, VAEDecodeOptions(compile=True, block_step=True), clamp=False)
    for expected in (1, 2):
        calls.clear()
        dec.reset()
        torch.testing.assert_close(_stream(dec, latent, [3, 2, 2]), ref, atol=1e-5, rtol=1e-5)
        assert len(calls) == expected


def test_decoders_share_the_fast_path_and_interleave():
    """Decoders of one VAE with equal options share one FastDecode (one converted copy, one set of compiled
    steps / graphs); other options, or the VAE moved to another dtype, get their own. Two videos decoded
    block by block in alternation each equal their own reference decode (each keeps its own cache)."""
    vae = _tiny(torch.float32)
    opt = VAEDecodeOptions(fused_norm="torch", conv_padding=True)
    a, b = StreamingDecoder(vae, opt, clamp=False), StreamingDecoder(vae, VAEDecodeOptions(**opt.model_dump()))
    assert a._fast is b._fast and StreamingDecoder(vae, VAEDecodeOptions(fused_norm="torch"))._fast is not a._fast
    la, lb = torch.randn(1, 16, 5, 2, 2), torch.randn(1, 16, 5, 2, 2)
    ref_a = _stream(StreamingDecoder(vae, clamp=False), la, [3, 2])
    ref_b = _stream(StreamingDecoder(vae, clamp=False), lb, [3, 2])
    b = StreamingDecoder(vae, opt, clamp=False)
    a0, b0 = a(la[:, :, :3]), b(lb[:, :, :3])
    b1, a1 = b(lb[:, :, 3:]), a(la[:, :, 3:])
    torch.testing.assert_close(torch.cat([a0, a1], 2), ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([b0, b1], 2), ref_b, atol=1e-5, rtol=1e-5)
    vae.double()
    assert StreamingDecoder(vae, opt)._fast is not a._fast
    release_fast_decode(vae)
    assert StreamingDecoder(vae.float(), opt)._fast is not a._fast  # released: built afresh


@pytest.mark.slow
def test_compiled_steady_step_equals_eager():
    """``compile`` (traced with the aot_eager backend on CPU: no codegen, so same ops, exact): the steady-state
    step of two streams (the second reuses the compiled step) equals the reference decode."""
    vae = _tiny(torch.float32)
    latent = torch.randn(1, 16, 6, 2, 2)
    ref = _stream(StreamingDecoder(vae, clamp=False), latent, [3, 3])
    dec = StreamingDecoder(vae, VAEDecodeOptions(compile=True, compile_backend="aot_eager", fused_norm="torch"),
                           clamp=False)
    for _ in range(2):
        dec.reset()
        torch.testing.assert_close(_stream(dec, latent, [3, 3]), ref, atol=0, rtol=0)
    assert len(dec._fast._steps) == 1


@pytest.mark.slow  # 2 s idle, ~30 s on the loaded shared machine
def test_benchmark_smoke(tmp_path):
    """benchmarks/vae_decode.py --smoke (CPU): rows in order, baseline speed-up 1 and error 0, the bf16 rows'
    error within the bf16 bound (frames in [-1, 1]), CUDA-only rows reported as skipped, frames per block."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "vae_decode.py"
    spec = importlib.util.spec_from_file_location("bench_vae_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "vae.json"
    module.main(["--smoke", "--rows", "bf16", "+channels_last", "+CUDA graph", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["eager fp32", "bf16", "+channels_last", "+CUDA graph"]
    assert rows[0]["speedup"] == 1 and rows[0]["max_err"] == 0
    assert all(0 < r["max_err"] < 0.2 for r in rows[1:3]) and "skipped" in rows[3]
    assert rows[0]["first_frames"] == 9 and rows[0]["block_frames"] == 12


# ------------------------------------------------------------------------------------------------- GPU
def _gpu_golden_vae():
    g = load_golden(golden_names("WanVAE_")[0])
    return _golden_vae(g).cuda(), g


def _rel_rms(a, b):
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


@pytest.mark.gpu
def test_gpu_bf16_within_bound_of_float32():
    """bf16 fast paths vs the float32 reference decode (TF32 off) on the golden latents and on a 7-frame
    random stream. Bound: relative RMS < 0.05 and max error < 0.1·max|ref| (the bf16 path on CPU measured
    0.013-0.019 and 0.022-0.028 on the golden); a wrong kernel or a stale cache gives O(1)."""
    vae, g = _gpu_golden_vae()
    latents = [g.io[c["latent_key"]].cuda() for c in g.meta["cases"]]
    latents.append(torch.randn(1, 16, 7, 6, 10, device="cuda", generator=torch.Generator("cuda").manual_seed(0)))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for latent in latents:
            with torch.no_grad():
                ref = vae.decode(latent, clamp=False).float()
            for opt in (VAEDecodeOptions(dtype="bfloat16"), VAEDecodeOptions.fastest(),
                        VAEDecodeOptions.fastest(fused_norm="torch", cuda_graph=False)):
                n = latent.shape[2]
                out = _stream(StreamingDecoder(vae, opt, clamp=False), latent, [min(3, n)] + [2] * ((n - 3) // 2))
                assert _rel_rms(out, ref) < 0.05, opt
                assert (out - ref).abs().max() < 0.1 * ref.abs().max(), opt


@pytest.mark.gpu
@pytest.mark.parametrize("options, tol", [
    (VAEDecodeOptions(cuda_graph=True), 1e-5),
    (VAEDecodeOptions(cuda_graph=True, channels_last=True, fused_norm="triton"), 1e-5),
    (VAEDecodeOptions(compile=True, fused_norm="torch"), 1e-4),
    (VAEDecodeOptions(compile=True, cuda_graph=True, channels_last=True, fused_norm="torch"), 1e-4),
    (VAEDecodeOptions(cuda_graph=True, block_step=True, conv_padding=True), 1e-4),
], ids=["graph", "graph+cl+triton", "compile", "compile+graph", "graph+block_step"])
def test_gpu_graph_and_compile_equal_eager(options, tol):
    """float32, TF32 off: CUDA-graph replays (same kernels as eager: 1e-5) and compiled steps (inductor's own
    fusions: 1e-4; whole-block steps: other conv shapes, 1e-4) equal the reference streaming decode over 3 blocks of 3 latent frames (first block eager,
    the graph from latent frame 3), and again for a second stream after ``reset`` (graph reused, cache
    reloaded). A stale or uncommitted cache would give O(0.1) errors on the later blocks."""
    vae, _ = _gpu_golden_vae()
    latent = torch.randn(1, 16, 9, 6, 10, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = _stream(StreamingDecoder(vae, clamp=False), latent, [3, 3, 3])
        dec = StreamingDecoder(vae, options, clamp=False)
        for _ in range(2):
            dec.reset()
            out = _stream(dec, latent, [3, 3, 3])
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert len(dec._fast._steps) == 1


@pytest.mark.gpu
def test_gpu_graph_shared_by_interleaved_videos():
    """Two videos on one shared CUDA graph, blocks in alternation (a0 b0 a1 b1 a2 b2 a3 b3): each video's cache
    is handed copies when the other takes the static buffers, so both equal their reference decode
    (float32, TF32 off, 1e-5); a lost hand-back would mix the two videos (O(0.1))."""
    vae, _ = _gpu_golden_vae()
    gen = torch.Generator("cuda").manual_seed(2)
    la, lb = (torch.randn(1, 16, 12, 6, 10, device="cuda", generator=gen) for _ in range(2))
    opt = VAEDecodeOptions(cuda_graph=True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref_a = _stream(StreamingDecoder(vae, clamp=False), la, [3] * 4)
        ref_b = _stream(StreamingDecoder(vae, clamp=False), lb, [3] * 4)
        a, b = StreamingDecoder(vae, opt, clamp=False), StreamingDecoder(vae, opt, clamp=False)
        out_a, out_b = [], []
        for i in range(0, 12, 3):
            out_a.append(a(la[:, :, i : i + 3]))
            out_b.append(b(lb[:, :, i : i + 3]))
    assert a._fast is b._fast and len(a._fast._steps) == 1
    torch.testing.assert_close(torch.cat(out_a, 2), ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(out_b, 2), ref_b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_triton_norm_bf16_matches_twin():
    """bf16 on CUDA: kernel and twin both compute in float32 and round once: within one bf16 ulp (2^-7 rel)."""
    norm = _norm(384).cuda()
    x = torch.randn(1, 384, 4, 30, 52, device="cuda", dtype=torch.bfloat16)
    for xx in (x, x.contiguous(memory_format=CL)):
        y = rms_norm_silu_triton(xx, norm.gamma, norm.scale)
        torch.testing.assert_close(y.float(), rms_norm_silu(xx, norm.gamma, norm.scale).float(),
                                   atol=1e-2, rtol=2**-7)
