"""Wan DiT with a second time for MeanFlow students (docs/meanflow.md, network).

:class:`MeanFlowWanDiT` is a :class:`~rcm_nets.wan.dit.WanDiT` that also takes the start ``r`` of the
averaging interval: the interval length ``d = t − r`` (Wan's 0..1000 scale) goes through its own sinusoid and
MLP, ``interval_embedding`` (``Linear(freq_dim, C) → SiLU → Linear(C, C)``), and is added to the time
embedding ``e`` before ``time_projection`` (so both the block modulation ``e0`` and the head see it). The last
Linear is zero-initialised: a fresh model, or a teacher loaded with :meth:`MeanFlowWanDiT.load_teacher`, equals
the teacher for every ``r`` (the paper conditions on ``(t, t − r)``, arXiv 2505.13447 sec. 4.3).

``r=None`` means ``r = t`` (the instantaneous velocity); :meth:`forward_block` (causal inference) uses that.
JVP: :meth:`forward_jvp` takes tangents of ``x``, ``t`` and ``r``; the interval's tangent is ``tt − tr``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._ops import cast, island, linear, silu, sinusoid
from .configs import WanConfig
from .dit import PromptKV, WanDiT

__all__ = ["MeanFlowWanDiT", "meanflow_student_state_dict"]

_INTERVAL = "interval_embedding."


def meanflow_student_state_dict(teacher: Mapping[str, Tensor], *, generator: torch.Generator | None = None
                                ) -> dict[str, Tensor]:
    """A ``WanDiT`` state dict extended with the initial interval embedding (N(0, 0.02) first Linear, zero last
    Linear and biases), ready for a strict load into :class:`MeanFlowWanDiT` (e.g. through a loader that only
    loads strictly, such as FSDP's full-state-dict load). Shapes and dtype follow ``time_embedding.0.weight``;
    raises if ``teacher`` already has interval keys or lacks the time embedding."""
    clash = sorted(k for k in teacher if k.startswith(_INTERVAL))
    if clash or "time_embedding.0.weight" not in teacher:
        raise ValueError(f"not a WanDiT teacher state dict: interval keys {clash}, time_embedding.0.weight "
                         f"{'present' if 'time_embedding.0.weight' in teacher else 'missing'}")
    w = teacher["time_embedding.0.weight"]
    c, freq = w.shape
    first = torch.empty(c, freq, dtype=torch.float32, device=w.device).normal_(std=0.02, generator=generator)
    new = {"0.weight": first.to(w.dtype), "0.bias": w.new_zeros(c), "2.weight": w.new_zeros(c, c),
           "2.bias": w.new_zeros(c)}
    return {**teacher, **{_INTERVAL + k: v for k, v in new.items()}}


class MeanFlowWanDiT(WanDiT):
    """``u(x, r, t)``: Wan DiT plus a zero-initialised interval embedding (the only new weights)."""

    def __init__(self, config: WanConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(config, device=device, dtype=dtype)
        fk = dict(device=device, dtype=dtype)
        c = config.dim
        self.interval_embedding = nn.Sequential(nn.Linear(config.freq_dim, c, **fk), nn.SiLU(),
                                                nn.Linear(c, c, **fk))
        self._interval: tuple[Tensor, Tensor | None] | None = None

    @classmethod
    def new_keys(cls) -> tuple[str, ...]:
        """State-dict keys a teacher lacks."""
        return tuple(_INTERVAL + k for k in ("0.weight", "0.bias", "2.weight", "2.bias"))

    @torch.no_grad()
    def init_interval_embedding(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) first Linear (as Wan's time MLP), zero last Linear (weight and bias): adds exactly 0."""
        first, last = self.interval_embedding[0], self.interval_embedding[2]
        nn.init.normal_(first.weight, std=0.02, generator=generator)
        nn.init.zeros_(first.bias)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Wan's initialization (:meth:`WanDiT.init_weights`), then :meth:`init_interval_embedding`."""
        super().init_weights(generator)
        self.init_interval_embedding(generator)

    def load_teacher(self, state_dict: dict[str, Tensor], *, generator: torch.Generator | None = None
                     ) -> list[str]:
        """Load a ``WanDiT`` state dict strictly: every teacher key must fit, and the only keys left over are
        :meth:`new_keys`, which get :meth:`init_interval_embedding`. Returns those new keys; raises
        (naming the keys) on anything else missing or unexpected."""
        result = self.load_state_dict(state_dict, strict=False)
        missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
        new = set(self.new_keys())
        if unexpected or missing != new:
            raise RuntimeError(f"teacher state dict does not fit MeanFlowWanDiT: unexpected {sorted(unexpected)}, "
                               f"missing {sorted(missing - new)}, already present {sorted(new - missing)}")
        self.init_interval_embedding(generator)
        return sorted(new)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor, context: Tensor | PromptKV, *, r: Tensor | None = None,
                tangents: tuple[Tensor | None, ...] | None = None, **kwargs):
        """Average velocity over ``[r, t]`` (Wan-scale times; ``r`` like ``t``, default ``t``).

        Keyword arguments as :meth:`WanDiT.forward`. ``tangents = (tx, tt, tr)`` (or ``(tx, tt)``: ``tr = 0``)
        runs the JVP mode; use :meth:`forward_jvp`. Returns ``out`` or ``(out, tangent_out)``.
        """
        tr = None
        if tangents is not None:
            tx, tt, *rest = tangents
            tr = rest[0] if rest else None
            tangents = (tx, tt)
        tt = None if tangents is None else tangents[1]
        d = torch.zeros_like(torch.as_tensor(t, dtype=torch.float64)) if r is None else \
            torch.as_tensor(t).to(torch.float64) - torch.as_tensor(r).to(torch.float64)
        if r is not None and d.shape != torch.as_tensor(t).shape:
            raise ValueError(f"r has shape {tuple(torch.as_tensor(r).shape)}, expected t's {tuple(t.shape)}")
        td = None
        if tangents is not None and (tt is not None or tr is not None):
            td = (0 if tt is None else tt.to(torch.float64)) - (0 if tr is None else tr.to(torch.float64))
        self._interval = (d, td)
        try:
            return super().forward(x, t, context, tangents=tangents, **kwargs)
        finally:
            self._interval = None

    def forward_jvp(self, x: Tensor, t: Tensor, context: Tensor | PromptKV, tx: Tensor | None, tt: Tensor | None,
                    *, r: Tensor | None = None, tr: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        """Output and its JVP along ``(tx, tt, tr)`` w.r.t. ``(x, t, r)`` (``None`` tangents are zero).

        Same contract as :meth:`WanDiT.forward_jvp` (hand-written forward mode, fused JVP attention, tangents
        detached, primal bit-identical to :meth:`forward`), plus ``r`` and its tangent ``tr``.
        """
        return self(x, t, context, r=r, tangents=(tx, tt, tr), **kwargs)

    def _time(self, t: Tensor, tt: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """:meth:`WanDiT._time` with ``interval_embedding(sinusoid(t − r))`` added to ``e``."""
        t = t[:, None] if t.dim() == 1 else t
        tt = None if tt is None else tt.reshape(t.shape)
        d, td = self._interval if self._interval is not None else (torch.zeros(t.shape, dtype=torch.float64,
                                                                               device=t.device), None)
        d = d.to(t.device).reshape(t.shape)
        td = None if td is None else td.to(t.device).reshape(t.shape)
        te0_, te2 = self.time_embedding[0], self.time_embedding[2]
        ie0, ie2 = self.interval_embedding[0], self.interval_embedding[2]
        isl = island(te0_.weight.dtype)
        s, ts = sinusoid(t, tt, self.config.freq_dim)
        h, th = silu(*linear(s.to(isl), cast(ts, isl), te0_.weight, te0_.bias, isl))
        e, te = linear(h, th, te2.weight, te2.bias, isl)
        sd, tsd = sinusoid(d, td, self.config.freq_dim)
        hd, thd = silu(*linear(sd.to(isl), cast(tsd, isl), ie0.weight, ie0.bias, isl))
        ed, ted = linear(hd, thd, ie2.weight, ie2.bias, isl)
        e = e + ed
        te = te if ted is None else (ted if te is None else te + ted)
        p = self.time_projection[1]
        e0, te0 = linear(*silu(e, te), p.weight, p.bias, isl)
        return e, te, e0.unflatten(-1, (6, -1)), (None if te0 is None else te0.unflatten(-1, (6, -1)))
