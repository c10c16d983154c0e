"""Configuration of streaming (block-by-block, KV-cached) generation: :class:`StreamSpec` (docs/causal.md).

Every value is checked when the spec is built, so a bad one is a named error before any weight loads.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.kv_cache import Extrapolation, KeySmoothing, KVDtype, PositionPolicy
from rcm_losses.sampling import flow_sigmas
from rcm_losses.schedules import check_schedule

from .components import WAN_NEGATIVE_PROMPT
from .config import PipelineConfig
from .streaming import DEFAULT_STREAM_TIMES

__all__ = ["StreamSpec", "latent_frames_for"]


class StreamSpec(PipelineConfig):
    """How a causal DiT streams a video: block layout, per-block step schedules, context refresh, CFG, cache."""

    times: list[float] | list[list[float]] = Field(default_factory=lambda: list(DEFAULT_STREAM_TIMES))
    """RF times of the denoising steps, strictly decreasing in (0, 1]: one list for every block, or a list
    per block whose last entry repeats (e.g. [[0.999, 0.9375, 0.833, 0.625], [0.833]]: 4 steps for block 0,
    then 1)."""
    solver: Literal["renoise", "euler"] = "renoise"
    """renoise: few-step student (x0 = x - t v, fresh noise to the next time); euler: multi-step teacher
    (ODE step x <- x - (t_k - t_k+1) v)."""
    euler_steps: int | None = Field(None, ge=1, le=1000)
    """solver=euler: N steps of Wan's shifted flow schedule (replaces `times`; None keeps `times`)."""
    shift: float = Field(3.0, gt=0)
    """solver=euler with euler_steps: the Wan time shift of that schedule (Causal-rCM's causal teacher: 3)."""
    refresh: Literal["clean", "last_step"] = "clean"
    """How a finished block enters the KV cache: clean = one extra pass on its x0 (noised to context_noise);
    last_step = the last denoising step writes (noisy context; the model must be trained for it)."""
    clean_refresh_blocks: int = Field(0, ge=0)
    """refresh=last_step: the first N blocks still use the clean pass (Causal-rCM's noisy-context preset: 1)."""
    context_noise: float = Field(0.0, ge=0.0, lt=1.0)
    """RF time at which the clean pass writes the block (0 = clean context; > 0 corrupts the history)."""
    guidance: float = Field(1.0, ge=1.0, le=50.0)
    """Classifier-free guidance scale; 1 = no unconditional pass. > 1 runs the negative prompt with its own
    KV cache at every step (multi-step causal teachers; Causal-rCM's causal teacher uses 3)."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """CFG negative prompt (Wan's default); used only when guidance > 1."""
    frames_per_block: int = Field(3, ge=1, le=64)
    """Latent frames per block (c3-3: 3; c1-4: 4)."""
    first_block_frames: int | None = Field(None, ge=1, le=64)
    """Latent frames of the first block (default frames_per_block; 1 for c1-N layouts and causal I2V)."""
    trained_frames: int = Field(21, ge=1)
    """Latent frames the model was trained on (sets the default attention window)."""
    sink_frames: int | None = Field(None, ge=0)
    """Latent frames kept forever at the start of the cache (default: the first block)."""
    window_frames: int | None = Field(None, ge=1)
    """Most recent latent frames kept in the cache (default: trained_frames - sink - one block, at least one
    block)."""
    kv_dtype: KVDtype = "bfloat16"
    """KV cache storage (int8 / fp8 / int4: quantized on write, read tile by tile; docs/kv_cache.md)."""
    group_size: int = Field(64, ge=1)
    """kv_dtype=int4: channels per scale (must divide the head dim)."""
    key_smoothing: KeySmoothing = "none"
    """kv_dtype=int8/fp8: first_block divides key channels by factors set from the first block."""
    position_policy: PositionPolicy = "absolute"
    """RoPE positions of cached frames after eviction (docs/kv_cache.md)."""
    extrapolation: Extrapolation = "sink_window"
    """Cache policy beyond the trained length: sink_window, infinity_rope (positions capped by
    trained_frames) or rolling_sink (sink cycles through a bank of sink_bank_frames; docs/kv_cache.md)."""
    sink_bank_frames: int | None = Field(None, ge=1)
    """extrapolation=rolling_sink: frames of the sink bank (default: sink_frames)."""
    timestep_bf16: bool = False
    """Round the network time 1000 t through bf16 as rcm does."""
    overlap_decode: bool = True
    """CUDA: decode block n on a side stream while the DiT denoises block n+1 (same frames, in order)."""
    cuda_graph: bool = False
    """CUDA: replay CUDA graphs of the DiT calls, one per static shape (cache length, block size, write pass;
    docs/causal.md); the session keeps them across videos. Eager on the CPU and for a shape's first call."""

    @field_validator("times")
    @classmethod
    def _times(cls, v):
        if not v:
            raise ValueError("times is empty")
        for i, ts in enumerate(v if isinstance(v[0], list) else [v]):
            check_schedule(ts, low=0.0, high=1.0, what=f"times (block {i})")
        return v

    @model_validator(mode="after")
    def _check(self) -> StreamSpec:
        if self.euler_steps is not None and self.solver != "euler":
            raise ValueError("euler_steps needs solver=euler")
        if self.clean_refresh_blocks and self.refresh != "last_step":
            raise ValueError("clean_refresh_blocks applies to refresh=last_step only")
        if self.key_smoothing != "none" and self.kv_dtype not in ("int8", "fp8"):
            raise ValueError(f"key_smoothing applies to int8/fp8 caches, not kv_dtype={self.kv_dtype}")
        if self.sink_bank_frames is not None and self.extrapolation != "rolling_sink":
            raise ValueError("sink_bank_frames needs extrapolation=rolling_sink")
        if self.refresh == "last_step" and self.context_noise > 0 and not self.clean_refresh_blocks:
            raise ValueError("context_noise is unused with refresh=last_step (the last step's noise level is "
                             "the context's): leave it 0 or use refresh=clean")
        return self

    # ------------------------------------------------------------------------------------------ derived
    def block_times(self) -> list[float] | list[list[float]]:
        """The schedule handed to ``stream_generate``: `times`, or the shifted flow schedule of euler_steps."""
        if self.euler_steps is None:
            return self.times
        return flow_sigmas(self.euler_steps, shift=self.shift).tolist()[:-1]

    def layout(self, i2v: bool = False) -> BlockLayout:
        """The block layout; causal I2V needs a first block of one latent frame (the image)."""
        first = self.first_block_frames
        if i2v and (first or self.frames_per_block) != 1:
            raise ValueError("causal I2V gives the image as the first block: set stream.first_block_frames=1")
        return BlockLayout(self.frames_per_block, first)

    def cache_frames(self, layout: BlockLayout) -> tuple[int, int]:
        """``(sink_frames, window_frames)`` of the rolling cache."""
        sink = layout.first if self.sink_frames is None else self.sink_frames
        window = self.window_frames or max(self.trained_frames - sink - layout.frames_per_block,
                                           layout.frames_per_block)
        return sink, window

    def cache_options(self) -> dict:
        """The ``make_kv_cache`` keywords of the storage and extrapolation settings."""
        return dict(kv_dtype=self.kv_dtype, position_policy=self.position_policy, group_size=self.group_size,
                    key_smoothing=self.key_smoothing, extrapolation=self.extrapolation,
                    trained_frames=self.trained_frames if self.extrapolation == "infinity_rope" else None,
                    sink_bank_frames=self.sink_bank_frames)

    def uses_cfg(self) -> bool:
        return self.guidance > 1

    def forwards_per_block(self, index: int) -> int:
        """DiT forward calls of generated block ``index`` (steps + clean refresh pass, x2 with CFG)."""
        times = self.block_times()
        steps = len(times[min(index, len(times) - 1)]) if isinstance(times[0], list) else len(times)
        clean = self.refresh == "clean" or index < self.clean_refresh_blocks
        return (steps + clean) * (2 if self.uses_cfg() else 1)


def latent_frames_for(pixel_frames: int, layout: BlockLayout, *, vae: bool) -> int:
    """Latent frames of whole blocks covering ``pixel_frames`` (Wan VAE: 1 + 4(T - 1) pixel frames)."""
    need = 1 + math.ceil((pixel_frames - 1) / 4) if vae else pixel_frames
    return layout.block_start(layout.num_blocks(need))
