"""Block masks: dense twins vs brute-force definitions, tile tables vs dense, Flex BlockMask vs dense."""

from __future__ import annotations

import pytest
import torch

from rcm_kernels import block_causal, sliding_window, teacher_forcing
from rcm_kernels.attention import attention_reference

TPF = 5  # tokens per frame: block boundaries land inside tiles of 8/16/32


def block_ids(num_tokens, first, fpb, tpf=TPF):
    """Brute-force block id of every token: a first block of ``first`` frames, then ``fpb`` frames each."""
    ids, blk, frames = [], 0, 0
    for t in range(num_tokens):
        f = t // tpf
        while f >= frames + (first if blk == 0 else fpb):
            frames += first if blk == 0 else fpb
            blk += 1
        ids.append(blk)
    return torch.tensor(ids)


PATTERNS = {"c1-1": (21, 1, None), "c3-3": (7, 3, None), "c1-4": (6, 4, 1)}  # (blocks, fpb, first)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_block_causal_matches_definition(pattern):
    nb, fpb, first = PATTERNS[pattern]
    m = block_causal(nb, fpb, TPF, first_block_frames=first)
    assert m.num_tokens == 21 * TPF  # every released pattern covers 21 latent frames
    b = block_ids(m.num_tokens, first or fpb, fpb)
    assert b[-1] == nb - 1
    want = b[None, :] <= b[:, None]  # [q, k]: keys of the same or earlier blocks
    assert torch.equal(m.dense(m.num_tokens, m.num_tokens, "cpu"), want)


def test_block_causal_density_formula():
    # N equal blocks: (N + 1) / (2N) of the pairs (docs/kernels.md, block masks: 0.571 for c3-3, 0.524 for c1-1)
    for nb, fpb in ((7, 3), (21, 1)):
        m = block_causal(nb, fpb, TPF)
        assert m.density(m.num_tokens, m.num_tokens) == pytest.approx((nb + 1) / (2 * nb))
    tf = teacher_forcing(7, 3, TPF)  # (N + 1) / (4N), ignoring the diagonal, which the blocks already hold
    assert tf.density(tf.num_tokens, tf.num_tokens) == pytest.approx(8 / 28)


def test_query_offset_is_a_row_slice():
    full = block_causal(4, 2, TPF, first_block_frames=1)
    L = full.num_tokens
    part = block_causal(4, 2, TPF, first_block_frames=1, q_offset=15)
    assert torch.equal(part.dense(10, 30, "cpu"), full.dense(L, L, "cpu")[15:25, :30])


def test_teacher_forcing_matches_definition():
    nb, fpb = 4, 2
    m = teacher_forcing(nb, fpb, TPF)
    half = nb * fpb * TPF
    assert m.num_tokens == 2 * half
    b = block_ids(half, fpb, fpb).repeat(2)
    noisy = torch.arange(2 * half) >= half
    bq, bk, nq, nk = b[:, None], b[None, :], noisy[:, None], noisy[None, :]
    clean_q = ~nq & ~nk & (bk <= bq)  # clean context: block-causal among clean blocks
    noisy_q = nq & ((~nk & (bk < bq)) | (nk & (bk == bq)))  # earlier clean blocks + its own noisy block
    want = clean_q | noisy_q
    got = m.dense(2 * half, 2 * half, "cpu")
    assert torch.equal(got, want)
    assert got.diagonal().all()  # every token sees itself (no empty rows)
    assert not got[half:, :half].diagonal().any()  # never its own clean copy (the target would leak)


def test_sliding_window_with_sink_matches_definition():
    m = sliding_window(7, 1, TPF, window_blocks=3, sink_blocks=2)
    b = block_ids(m.num_tokens, 1, 1)
    bq, bk = b[:, None], b[None, :]
    want = ((bk <= bq) & (bk > bq - 3)) | ((bk < 2) & (bk <= bq))
    assert torch.equal(m.dense(m.num_tokens, m.num_tokens, "cpu"), want)


def _all_masks():
    return [block_causal(4, 2, TPF, first_block_frames=1), teacher_forcing(3, 1, 7),
            sliding_window(6, 1, 9, window_blocks=2, sink_blocks=1),
            block_causal(5, 1, 6, q_offset=12)]


@pytest.mark.parametrize("bm, bn", [(8, 16), (16, 8), (32, 32)])
@pytest.mark.parametrize("mask_idx", range(4))
def test_tile_table_agrees_with_dense(mask_idx, bm, bn):
    m = _all_masks()[mask_idx]
    lq = m.num_tokens - m.q_offset
    lk = m.num_tokens - 3  # a ragged key length that is not a multiple of the tile
    lq = min(lq, lk)
    dense = m.dense(lq, lk, "cpu")
    t = m.tiles(lq, lk, bm, bn, "cpu")
    nq, nk = -(-lq // bm), -(-lk // bn)
    listed = torch.zeros(nq, nk, dtype=torch.int8)  # 2 full, 1 partial
    for i in range(nq):
        listed[i, t.kv_full_idx[i, : t.kv_full_num[i]].long()] = 2
        assert (listed[i, t.kv_part_idx[i, : t.kv_part_num[i]].long()] == 0).all(), "tile listed twice"
        listed[i, t.kv_part_idx[i, : t.kv_part_num[i]].long()] = 1
    for i in range(nq):
        for j in range(nk):
            block = dense[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            inside = (i + 1) * bm <= lq and (j + 1) * bn <= lk
            if listed[i, j] == 2:
                assert inside and block.all(), f"tile {i},{j} marked full"
            elif listed[i, j] == 0:
                assert not block.any(), f"tile {i},{j} skipped but has allowed pairs"
            else:
                assert block.any() and not (inside and block.all()), f"tile {i},{j} marked partial"
    transposed = torch.zeros(nk, nq, dtype=torch.int8)  # the backward's key-major lists: the same tiles
    for j in range(nk):
        transposed[j, t.q_full_idx[j, : t.q_full_num[j]].long()] = 2
        transposed[j, t.q_part_idx[j, : t.q_part_num[j]].long()] = 1
    assert torch.equal(transposed.T, listed)
    assert t.density == pytest.approx(dense.float().mean().item())


def test_flex_block_mask_agrees_with_tile_table_and_dense():
    m = block_causal(3, 2, 50, first_block_frames=1)  # 250 tokens: two 128-tiles, boundary at 50 and 150
    L = m.num_tokens
    fb = m.flex(L, L, "cpu")
    assert fb is m.flex(L, L, "cpu"), "Flex masks are cached by shape"
    blocks = fb.to_dense()[0, 0].bool()  # [2, 2] tiles with any allowed pair
    dense = m.dense(L, L, "cpu")
    want = torch.tensor([[dense[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].any() for j in range(2)]
                         for i in range(2)])
    assert torch.equal(blocks, want)
    # the mask_mod the partial tiles evaluate is the dense twin, elementwise
    q_idx, kv_idx = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(fb.mask_mod(0, 0, q_idx, kv_idx), dense)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_with_mask_matches_reference():
    # eager flex_attention on CPU (the first call pays ~10 s of one-off tracing, hence slow)
    from torch.nn.attention.flex_attention import flex_attention

    m = teacher_forcing(2, 1, 70)  # 280 tokens
    L = m.num_tokens
    q, k, v = (torch.randn(1, L, 2, 16) for _ in range(3))
    got = flex_attention(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=m.flex(L, L, "cpu"))
    want = attention_reference(*(x.double() for x in (q, k, v)), mask=m).out
    # fp32 math on both sides over <= 280 keys; 1e-5 is ~30x the observed 3e-7
    torch.testing.assert_close(got.transpose(1, 2).double(), want, atol=1e-5, rtol=1e-5)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="window_blocks"):
        sliding_window(4, 1, TPF, window_blocks=0)
    with pytest.raises(ValueError, match="sink_blocks"):
        block_causal(4, 1, TPF).__class__(block_causal(4, 1, TPF).blocks, sink_blocks=1)
    with pytest.raises(ValueError, match="frames_per_block"):
        block_causal(4, 0, TPF)
    m = block_causal(4, 1, TPF)
    with pytest.raises(ValueError, match="covers 20 tokens"):
        m.dense(21, 21, "cpu")


def test_large_tile_table_is_fast():
    import time

    m = teacher_forcing(7, 3, 1560)  # the packed 65,520-token teacher-forcing sequence
    t0 = time.perf_counter()
    t = m.tiles(m.num_tokens, m.num_tokens, 128, 64, "cpu")
    assert time.perf_counter() - t0 < 10.0  # ~0.6 s on one CPU core; the mask is built once per shape
    assert t.density == pytest.approx(8 / 28, rel=1e-3)
