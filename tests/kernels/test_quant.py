"""int8 / fp8 / int4 quantize-dequantize round trip and key smoothing: worst-case error bounds derived from
the formats, group layouts checked against absmax computed here."""

import pytest
import torch

from rcm_kernels.quant import (
    INT4_QMAX,
    QMAX,
    dequantize,
    dequantize_int4_keys,
    dequantize_int4_values,
    dequantize_keys,
    dequantize_values,
    pack_int4,
    quantize,
    quantize_int4_keys,
    quantize_int4_values,
    quantize_keys,
    quantize_keys_smoothed,
    quantize_values,
    smoothing_factors,
    storage_dtype,
    unpack_int4,
)

# x/scale is formed in float32, so rounding may land one float32 ulp off the exact grid point: slack 1e-6·|x|.
_SLACK = 1e-6


def _bound(x, scale, fmt):
    """Worst-case |x - deq(q(x))| for each element, given its group's scale."""
    if fmt == "int8":
        return scale / 2  # round to nearest on a grid of step `scale`
    # e4m3: 3 mantissa bits -> half-ulp is 2^-4 of the value's binade (≤ 2^-4·|x|) for normals;
    # subnormals (|x/scale| < 2^-6) sit on a grid of 2^-9, half-step 2^-10 (in units of `scale`).
    return torch.maximum(x.abs() * 2**-4, scale * 2**-10)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_round_trip_within_format_bound(fmt):
    x = torch.randn(2, 3, 7, 4, 16, dtype=torch.float64) * torch.logspace(-3, 2, 16, dtype=torch.float64)
    q = quantize(x, fmt, dim=2)
    assert q.data.dtype == storage_dtype(fmt) and q.scale.shape == (2, 3, 1, 4, 16)
    err = (dequantize(q, torch.float64) - x).abs()
    bound = _bound(x, q.scale.double(), fmt)
    assert (err <= bound + _SLACK * x.abs()).all(), (err - bound).max()
    # The group's absmax element maps to ±qmax, so it is exact up to float32 rounding of the scale.
    amax_err = (err * (x.abs() == x.abs().amax(2, keepdim=True))).amax()
    assert amax_err <= 1e-6 * x.abs().max()


def test_int8_codes_span_the_range_and_zero_group_is_exact():
    x = torch.randn(4, 32)
    x[1] = 0.0
    q = quantize(x, "int8", dim=1)
    assert q.data.abs().amax(1).tolist() == [127, 0, 127, 127]
    assert torch.equal(dequantize(q)[1], torch.zeros(32))


def _channel_norm(x):
    return x.flatten(0, -2).norm(dim=0)  # [D]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_key_scales_are_per_channel_per_frame(fmt):
    # Keys whose channels differ by 1000x: per-channel scales keep every channel's relative error small;
    # a per-token int8 scale would round the small channels to zero (relative error ~1).
    b, f, t, h, d = 1, 3, 8, 2, 16
    ch = torch.logspace(-3, 0, d)
    k = torch.randn(b, f, t, h, d) * ch
    kq = quantize_keys(k, fmt)
    assert kq.scale.shape == (b, f, h, d)
    torch.testing.assert_close(kq.scale, k.abs().amax(2) / QMAX[fmt])
    deq = dequantize_keys(kq.data, kq.scale)
    rel = _channel_norm(deq - k) / _channel_norm(k)
    limit = {"int8": 0.01, "fp8": 0.05}[fmt]  # RMS of uniform rounding: int8 ~0.003, e4m3 ~2^-4/sqrt(3)=0.036 at most
    assert rel.max() < limit, rel
    if fmt == "int8":  # contrast: per-token int8 scales round the small channels away (fp8's exponent copes)
        tok = dequantize(quantize(k, fmt, dim=4))
        assert (_channel_norm(tok - k) / _channel_norm(k)).max() > 0.3


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_value_scales_are_per_token(fmt):
    v = torch.randn(2, 10, 3, 16) * torch.logspace(-2, 1, 10)[:, None, None]
    vq = quantize_values(v, fmt)
    assert vq.scale.shape == (2, 10, 3)
    torch.testing.assert_close(vq.scale, v.abs().amax(3) / QMAX[fmt])
    err = (dequantize_values(vq.data, vq.scale) - v).abs()
    assert (err <= _bound(v, vq.scale[..., None], fmt) + _SLACK * v.abs()).all()


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown quantization format"):
        quantize(torch.ones(3), "int4", dim=0)
    with pytest.raises(ValueError, match=r"\[B, F, T, H, D\]"):
        quantize_keys(torch.ones(2, 3, 4, 5), "int8")
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        quantize_values(torch.ones(2, 3, 4), "int8")


# ---------------------------------------------------------------------------------------------------- int4

def test_int4_pack_unpack_every_code_pair():
    # All 16 x 16 (low, high) nibble pairs round-trip, and the byte layout is low nibble = channel 2i.
    lo, hi = torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij")
    codes = torch.stack((lo.flatten(), hi.flatten()), -1)  # [256, 2]
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert torch.equal(unpack_int4(packed), codes.to(torch.int8))
    assert packed[(codes[:, 0] == 3) & (codes[:, 1] == -1)].item() == 0xF3  # 3 | (0xF << 4)


def test_int4_keys_group_tokens_of_a_frame_per_channel():
    # T=10 tokens, groups of 4 -> groups [0,4), [4,8), [8,10) (the last shorter); scale = group absmax / 7.
    x = torch.randn(2, 3, 10, 2, 8, dtype=torch.float64) * torch.logspace(-2, 1, 8, dtype=torch.float64)
    q = quantize_int4_keys(x, 4)
    assert q.data.shape == (2, 3, 10, 2, 4) and q.scale.shape == (2, 3, 3, 2, 8)
    for g, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]):
        want = x[:, :, a:b].abs().amax(2) / INT4_QMAX
        torch.testing.assert_close(q.scale[:, :, g].double(), want, rtol=1e-6, atol=0)
    err = (dequantize_int4_keys(q.data, q.scale, 4, torch.float64) - x).abs()
    bound = q.scale.double().repeat_interleave(4, 2)[:, :, :10] / 2  # round to nearest, step = scale
    assert (err <= bound * (1 + 1e-6)).all()


def test_int4_values_group_channels_of_a_token():
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64) * 3
    q = quantize_int4_values(x, 4)
    assert q.data.shape == (2, 5, 3, 8) and q.scale.shape == (2, 5, 3, 4)
    torch.testing.assert_close(q.scale.double(), x.unflatten(-1, (4, 4)).abs().amax(-1) / INT4_QMAX,
                               rtol=1e-6, atol=0)
    err = (dequantize_int4_values(q.data, q.scale, torch.float64) - x).abs()
    assert (err <= q.scale.double().repeat_interleave(4, -1) / 2 * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="does not divide head_dim"):
        quantize_int4_values(torch.randn(1, 2, 1, 12), 8)


def test_smoothed_keys_round_trip_and_pair_tied_factors():
    x = torch.randn(2, 3, 5, 2, 8, dtype=torch.float64) * torch.logspace(-3, 1, 8, dtype=torch.float64)
    c = smoothing_factors(x)
    assert c.shape == (2, 2, 8) and torch.equal(c[..., 0::2], c[..., 1::2])  # tied within RoPE pairs
    pair = x.abs().amax((1, 2)).unflatten(-1, (-1, 2)).amax(-1)  # [B, H, D/2]
    want = pair.maximum(pair.amax(-1, keepdim=True) * 1e-3)  # floored at 1e-3 x the largest channel
    assert (want > pair).any()  # the floor is exercised (channels span 1e-3..10)
    torch.testing.assert_close(c[..., 1::2], want.float())
    q = quantize_keys_smoothed(x, c, "int8")
    assert q.data.shape == x.shape and q.scale.shape == (2, 3, 5, 2)  # one scale per token
    xs = x / c[:, None, None].double()
    err = (dequantize((q.data, q.scale[..., None]), torch.float64) - xs).abs()
    assert (err <= q.scale.double()[..., None] / 2 + _SLACK * xs.abs()).all()
