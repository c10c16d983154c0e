"""Self forcing (the DMD side, on-policy): the student generates the video block by block through two
callables, exactly as inference does: ``denoise_block`` (reads the KV cache) and ``commit_block`` (writes a
block's context k/v). Each block runs its few-step chain up to an *exit step*; only the exit step carries
grad, earlier steps and every cache write run without grad (context k/v detached). :func:`replay_backward`
/ :func:`replayed_video` give the same gradients while keeping one block's activations at a time
(docs/causal_training.md, "Self forcing").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rcm_losses.causal.blocks import FrameBlocks
from rcm_losses.parameterization import (
    TrigFlowPrediction,
    add_noise,
)
from rcm_losses.rollout import denoise_chain
from rcm_losses.schedules import block_schedules

_F64 = torch.float64


# ------------------------------------------------------------------------------------------ self forcing
BlockDenoiser = Callable[[Tensor, Tensor, int], TrigFlowPrediction]
"""``(x_t [B, C, Tb, H, W], t [B], block_index) -> TrigFlowPrediction``: the student on one block,
attending to the blocks committed so far (the cache is read, not written)."""
BlockCommit = Callable[[Tensor, Tensor, int], None]
"""``(x [B, C, Tb, H, W], t [B], block_index) -> None``: run the network on a finished block at (context) time
``t`` and write its k/v to the cache (the context of later blocks). Called under ``torch.no_grad()``."""


class SelfForcingRollout(NamedTuple):
    """Result of :func:`self_forcing_rollout`.

    ``x0`` ``[B, C, T, H, W]`` (``out_dtype``): the generated video; block i carries grad through its exit
    step only (when the rollout ran with grad). Per block (``given`` blocks: ``exit_steps = -1``,
    ``exit_inputs`` and ``times`` None): ``exit_steps``; ``times`` the TrigFlow grid ``[e + 2, B]`` actually
    run (last entry 0); ``exit_inputs`` the detached sample fed to the exit step; ``contexts`` /
    ``context_times`` the detached sample and time ``[B]`` committed to the cache. Everything
    :func:`replayed_video` needs.
    """

    x0: Tensor
    exit_steps: tuple[int, ...]
    times: tuple[Tensor | None, ...]
    exit_inputs: tuple[Tensor | None, ...]
    contexts: tuple[Tensor, ...]
    context_times: tuple[Tensor, ...]


def _schedules(schedule: Sequence[float] | Sequence[Sequence[float]], num_blocks: int) -> list[list[float]]:
    """One strictly decreasing TrigFlow schedule in (0, pi/2] per block (:func:`rcm_losses.schedules.block_schedules`)."""
    return block_schedules(schedule, num_blocks, low=0.0, high=math.pi / 2, what="a self-forcing schedule")


def sample_exit_steps(
    lengths: Sequence[int], *, generator: torch.Generator, same_across_blocks: bool = True
) -> tuple[int, ...]:
    """Random exit steps (gradient truncation, docs/causal_training.md): block i exits at step ``e_i < lengths[i]``.

    ``same_across_blocks``: one uniform draw ``e`` in ``[0, max(lengths))``, capped per block at
    ``lengths[i] - 1``; else one uniform draw per block. Every rank of a sharded run must use the same exit
    steps (the number of network calls must match): pass a generator seeded identically on all ranks.
    """
    if not lengths or min(lengths) < 1:
        raise ValueError(f"every block needs at least one step, got lengths {list(lengths)}")
    if same_across_blocks:
        e = int(torch.randint(max(lengths), (), generator=generator, device=generator.device))
        return tuple(min(e, n - 1) for n in lengths)
    return tuple(int(torch.randint(n, (), generator=generator, device=generator.device)) for n in lengths)


def cycled_exit_steps(
    effective_iteration: int, lengths: Sequence[int], max_steps: int | None = None
) -> tuple[int, ...]:
    """rcm's deterministic exit (docs/causal_training.md): ``n = it % max_steps + 1`` steps, capped per block at its
    schedule length; returns exit indices ``min(n, len_i) - 1``."""
    max_steps = max(lengths) if max_steps is None else max_steps
    if effective_iteration < 0 or max_steps < 1:
        raise ValueError(
            f"need effective_iteration >= 0 and max_steps >= 1, got {effective_iteration}, {max_steps}"
        )
    n = effective_iteration % max_steps + 1
    return tuple(min(n, m) - 1 for m in lengths)


def _randn(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)


def self_forcing_rollout(
    denoise_block: BlockDenoiser,
    commit_block: BlockCommit,
    shape: Sequence[int],
    blocks: FrameBlocks,
    schedule: Sequence[float] | Sequence[Sequence[float]],
    *,
    generator: torch.Generator,
    exit_steps: Sequence[int],
    given: Tensor | None = None,
    context_time: float = 0.0,
    with_grad: bool = True,
    out_dtype: torch.dtype = torch.float32,
) -> SelfForcingRollout:
    """Block-by-block student rollout with the cache, exactly as at inference (docs/causal_training.md).

    ``shape`` = ``[B, C, T, H, W]``. Noise is drawn from ``generator`` for the whole video, in this order: the
    start noise ``eps_0`` (block i starts from ``sin t_0 eps_0``: pure noise at ``t_0 = pi/2``, the TrigFlow
    form of the sampler's ``s_0 eps`` below it), then one re-noise tensor per step transition (``max_len -
    1``), then (if ``context_time > 0``) the context noise; block i uses its frame slice of each, so the draws
    do not depend on the exit steps. ``schedule``: TrigFlow times ``t_0 > t_1 > ...`` (``pi/2`` = pure noise),
    one list for all blocks or one per block (last repeated). For block i:

    1. :func:`rcm_losses.rollout.denoise_chain` from the start sample over ``[t_0 .. t_{e_i}, 0]``:
       ``x0_hat = denoise_block(x, t_k, i)``, re-noise ``x = cos t_{k+1} x0_hat + sin t_{k+1} eps_k``; steps
       before the exit ``e_i = exit_steps[i]`` run under ``no_grad``, the exit step with grad (if
       ``with_grad``);
    2. under ``no_grad``: ``commit_block(ctx, t_c, i)`` with ``ctx = x0_hat`` detached (``context_time = 0``)
       or re-noised to ``t_c`` (noisy context). The cache never carries grad into later blocks.

    ``given`` ``[B, C, G, H, W]``: the first blocks are given (causal I2V: the image latent, G = frames of the
    given blocks); they are committed at ``t = 0`` and returned unchanged (no grad). ``exit_steps`` has one
    entry per block (entries of given blocks are ignored); see :func:`sample_exit_steps`.
    """
    b, c, t_len, h, w = shape
    if t_len != blocks.num_frames:
        raise ValueError(f"shape has {t_len} frames, the blocks cover {blocks.num_frames}")
    n = blocks.num_blocks
    scheds = _schedules(schedule, n)
    if len(exit_steps) != n:
        raise ValueError(f"need one exit step per block ({n}), got {len(exit_steps)}")
    n_given = _given_blocks(given, blocks, shape)
    for i in range(n_given, n):
        if not 0 <= exit_steps[i] < len(scheds[i]):
            raise ValueError(
                f"block {i}: exit step {exit_steps[i]} outside its {len(scheds[i])}-step schedule"
            )
    x_start = _randn(shape, generator)
    step_noise = [_randn(shape, generator) for _ in range(max(map(len, scheds)) - 1)]
    ctx_noise = _randn(shape, generator) if context_time > 0 else None
    t_c = torch.full((b,), float(context_time), dtype=_F64, device=x_start.device)
    zero = torch.zeros(b, dtype=_F64, device=x_start.device)
    outs, exits, grids, inputs, ctxs, ctx_ts = [], [], [], [], [], []
    for i, sl in enumerate(blocks.slices):
        if i < n_given:
            x0_i, ctx, tc = given[:, :, sl].to(out_dtype), given[:, :, sl].detach(), zero
            e, grid, x_exit = -1, None, None
        else:
            e = int(exit_steps[i])
            grid = torch.tensor([*scheds[i][: e + 1], 0.0], dtype=_F64, device=x_start.device)
            grid = grid[:, None].expand(-1, b)
            x_init = math.sin(scheds[i][0]) * x_start[:, :, sl]  # TrigFlow sample of pure noise at t_0
            chain = denoise_chain(
                lambda x, t, _c, i=i: denoise_block(x, t, i),
                x_init,
                grid,
                None,
                noises=[z[:, :, sl] for z in step_noise[:e]],
                with_grad=with_grad,
                out_dtype=out_dtype,
            )
            x0_i, x_exit = chain.x0, chain.inputs[-1]
            ctx = x0_i.detach() if ctx_noise is None else add_noise(x0_i.detach(), ctx_noise[:, :, sl], t_c)
            tc = zero if ctx_noise is None else t_c
        with torch.no_grad():
            commit_block(ctx, tc, i)
        for lst, v in zip((outs, exits, grids, inputs, ctxs, ctx_ts), (x0_i, e, grid, x_exit, ctx, tc)):
            lst.append(v)
    return SelfForcingRollout(
        torch.cat(outs, dim=2), tuple(exits), tuple(grids), tuple(inputs), tuple(ctxs), tuple(ctx_ts)
    )


def _given_blocks(given: Tensor | None, blocks: FrameBlocks, shape: Sequence[int]) -> int:
    """Number of leading blocks covered by ``given`` (must end on a block boundary, leave one to generate)."""
    if given is None:
        return 0
    ends = [s.stop for s in blocks.slices]
    g = given.shape[2]
    if (
        given.ndim != 5
        or tuple(given.shape[:2]) != tuple(shape[:2])
        or tuple(given.shape[3:]) != tuple(shape[3:])
        or g not in ends[:-1]
    ):
        raise ValueError(
            f"given frames {tuple(given.shape)} must be [B, C, G, H, W] like {tuple(shape)} with G a "
            f"block boundary before the last block ({ends[:-1]})"
        )
    return ends.index(g) + 1


def replay_backward(
    rollout: SelfForcingRollout,
    denoise_block: BlockDenoiser,
    commit_block: BlockCommit,
    blocks: FrameBlocks,
    grad_video: Tensor,
    *,
    reset: Callable[[], None],
    check_atol: float | None = None,
) -> None:
    """Replayed backprop of a no-grad rollout (docs/causal_training.md): accumulate into the parameters the gradient
    of a loss whose derivative w.r.t. the video is ``grad_video`` ``[B, C, T, H, W]``, one block at a time.

    ``reset()`` the cache once, then for block i: recompute the exit step ``denoise_block(exit_input_i,
    t_{e_i}, i)`` with grad against the cache holding exactly blocks < i, backpropagate the block's slice of
    ``grad_video`` (one ``torch.autograd.backward`` per block: peak activations of one block), and re-commit
    the block's saved context under ``no_grad``. The parameter gradients equal those of the plain rollout
    (whose cache carries no grad either). ``check_atol``: also assert that each recomputed block matches the
    rollout (catches a cache that does not restart at ``reset()``). Each block's backward is a separate
    top-level backward, so this composes with FSDP2 (gradients are reduced per backward).
    """
    reset()
    for i, sl in enumerate(blocks.slices):
        if rollout.exit_steps[i] >= 0:
            e = rollout.exit_steps[i]
            with torch.enable_grad():
                x0_i = denoise_block(rollout.exit_inputs[i], rollout.times[i][e], i).x0.to(rollout.x0.dtype)
            if check_atol is not None and not torch.allclose(
                x0_i.detach(), rollout.x0[:, :, sl], atol=check_atol, rtol=0
            ):
                raise RuntimeError(
                    f"replayed block {i} differs from the rollout: the cache did not restart at "
                    "reset() or denoise_block is not deterministic"
                )
            if x0_i.requires_grad:
                torch.autograd.backward(x0_i, grad_video[:, :, sl].to(x0_i.dtype))
        with torch.no_grad():
            commit_block(rollout.contexts[i], rollout.context_times[i], i)


class _Replay(torch.autograd.Function):
    """Identity on the video whose backward runs ``replay(grad)`` (re-entrant autograd)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, video: Tensor, replay: Callable[[Tensor], None]) -> Tensor:
        ctx.replay = replay
        return video.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.replay(grad)
        return None, None, None


def replayed_video(
    rollout: SelfForcingRollout,
    denoise_block: BlockDenoiser,
    commit_block: BlockCommit,
    blocks: FrameBlocks,
    *,
    reset: Callable[[], None],
    check_atol: float | None = None,
) -> Tensor:
    """The rollout's video with replayed backprop: use it in place of ``rollout.x0`` (rollout run with
    ``with_grad=False``); its backward runs :func:`replay_backward` with ``dL/dG``.

    The replay runs *inside* the outer backward (re-entrant autograd). That is fine for plain modules; with
    FSDP2-sharded networks call :func:`replay_backward` directly instead (its per-block backward passes are
    top-level ones, which FSDP2's backward hooks expect).
    """
    anchor = torch.zeros((), requires_grad=True)
    replay = lambda grad: replay_backward(
        rollout, denoise_block, commit_block, blocks, grad, reset=reset, check_atol=check_atol
    )
    return _Replay.apply(anchor, rollout.x0, replay)
