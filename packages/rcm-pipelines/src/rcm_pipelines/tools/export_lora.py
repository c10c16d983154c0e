"""Export a distilled student as a LoRA delta against its teacher, in the Wan LoRA layout of ComfyUI / diffusers.

    rcm-export-lora --student rCM_1.3B.safetensors --teacher Wan2.1-T2V-1.3B.pth \\
        --rank 64 --out rcm_1.3B_lora_r64.safetensors --report_ranks 16,32,64,128,256

Layout (keys prefixed ``diffusion_model.``, the official Wan module names), read as it is by ComfyUI's LoRA
loader and by diffusers' Wan LoRA loading (``WanPipeline.lora_state_dict`` / ``load_lora_weights``, which
renames the keys to ``WanTransformer3DModel`` modules):

* every 2-D ``.weight`` (the Linear layers: attention q/k/v/o, FFN, text/time embeddings, head): the best
  rank-``r`` approximation of ``dW = W_student - W_teacher`` from its SVD ``U S V^T``, as
  ``<m>.lora_up.weight = U_r sqrt(S_r)`` ``[out, r]`` and ``<m>.lora_down.weight = sqrt(S_r) V_r^T`` ``[r, in]``,
  applied as ``W = W_teacher + up @ down`` (scale 1: with no ``.alpha`` key both loaders use scale 1;
  ``--alpha`` writes ``<m>.alpha = r``, which means the same to ComfyUI but which diffusers' Wan converter
  refuses on the head, time projection and text/time embeddings). A Linear whose bias changed and whose
  weight did not gets a zero rank-1 pair, so that its ``.diff_b`` has a LoRA layer to attach to in diffusers;
* every other tensor that changed, exactly: ``<m>.diff_b`` for biases, ``<m>.diff`` for other weights
  (norms, modulation tables, the Conv3d patch embedding) and ``<key>.diff`` for parameters that are not
  ``.weight`` / ``.bias`` (``blocks.N.modulation``).

What each loader applies (``--diffs``): ComfyUI applies every key. diffusers applies the LoRA pairs and the
``.diff_b`` of Linear layers (as the LoRA layer's bias) and skips the rest with a log line: the modulation
tables, the patch embedding and the norms (its Wan layers have no LoRA form for them). ``--diffs all``
(default) writes every exact delta (a diffusers load then misses the skipped ones; the report says which and
how much of the delta they are), ``--diffs diffusers`` writes only those diffusers applies (both loaders then
give the same network), ``--diffs none`` (or ``--no_diffs``) writes no exact delta at all.

The reconstruction error is reported as a relative Frobenius norm: over the low-rank layers
(``||dW - up @ down|| / ||dW||`` with ``up`` / ``down`` as stored, so the storage rounding counts), over
the whole network delta as written (``.diff`` tensors count as exact, left-out ones as missing) and over the
whole delta as diffusers applies it; ``--report_ranks`` lists the optimal error of other ranks from the same
SVDs (discarded singular values). The numbers go into the file's safetensors metadata too.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rcm_nets.wan import diffusers_format as dfm

from . import ckpt_io

__all__ = ["LoraResult", "lora_from_delta", "export_lora", "main", "LORA_PREFIX", "DIFFS"]

LORA_PREFIX = "diffusion_model."
Diffs = Literal["all", "diffusers", "none"]
DIFFS: tuple[str, ...] = ("all", "diffusers", "none")
"""Which exact deltas are written: every one, those diffusers applies (Linear biases), none."""


@dataclass
class LoraResult:
    """The LoRA state dict and its reconstruction errors."""

    state_dict: dict[str, Tensor]
    rank: int
    lowrank_error: float
    """||dW - up@down|| / ||dW|| over all low-rank layers together (Frobenius), with up / down as stored."""
    total_error: float
    """The same over every tensor of the network delta (diffs exact, left-out ones as missing)."""
    worst_layer: tuple[str, float]
    """Low-rank layer with the largest relative error, and that error."""
    errors_by_rank: dict[int, float] = field(default_factory=dict)
    """For each report rank (and ``rank``): the optimal low-rank error from the discarded singular values
    (before storage rounding)."""
    lora_params: int = 0
    delta_params: int = 0
    diffusers_error: float = 0.0
    """Relative error over the whole network delta as diffusers applies the file (the LoRA pairs and the Linear
    biases; the skipped and left-out exact deltas count as missing)."""
    diffusers_skipped: list[str] = field(default_factory=list)
    """Keys written that diffusers' Wan LoRA loading skips (modulation, patch embedding, norms)."""


def _unwrap(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip a wrapper prefix (``net.``, ``net_ema.``, ...) that every key carries; diffusers module names
    (a ``WanTransformer3DModel`` folder) become the official ones."""
    for p in ckpt_io.WRAPPER_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
            break
    return dfm.state_dict_from_diffusers(sd) if dfm.is_diffusers_state_dict(sd) else sd


def _diff_key(key: str) -> str:
    if key.endswith(".bias"):
        return key[: -len(".bias")] + ".diff_b"
    if key.endswith(".weight"):
        return key[: -len(".weight")] + ".diff"
    return key + ".diff"


def _is_linear_bias(key: str, sd: dict[str, Tensor]) -> bool:
    """A bias whose module's weight is a matrix (a Linear layer): diffusers can take its delta."""
    w = sd.get(key.removesuffix(".bias") + ".weight") if key.endswith(".bias") else None
    return w is not None and w.dim() == 2


def lora_from_delta(student: dict[str, Tensor], teacher: dict[str, Tensor], rank: int, *,
                    dtype: torch.dtype = torch.bfloat16, diffs: Diffs | bool = "all", alpha: bool = False,
                    report_ranks: list[int] = (), device: str | torch.device = "cpu",
                    svd_dtype: torch.dtype = torch.float32) -> LoraResult:
    """LoRA (``diffusion_model.*`` keys) of ``student - teacher`` at ``rank``; see the module docstring.

    Both dicts must have the same keys and shapes (module keys, official or diffusers names; wrapper prefixes
    are stripped). A teacher tensor in another dtype than the student's is first rounded to the student's.
    Tensors that did not change produce no key. Each matrix uses rank ``min(rank, out, in)``; at full rank the
    reconstruction is exact up to the SVD's rounding (``svd_dtype``) and the storage ``dtype``. ``diffs``:
    ``"all"`` / ``"diffusers"`` / ``"none"`` (``True`` / ``False`` mean all / none); ``alpha``: write
    ``<m>.alpha = r`` keys.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if isinstance(diffs, bool):
        diffs = "all" if diffs else "none"
    if diffs not in DIFFS:
        raise ValueError(f"diffs must be one of {list(DIFFS)}, got {diffs!r}")
    student, teacher = _unwrap(student), _unwrap(teacher)
    if set(student) != set(teacher):
        only_s, only_t = sorted(set(student) - set(teacher)), sorted(set(teacher) - set(student))
        raise KeyError(f"student and teacher keys differ: only in student {only_s[:5]}, only in teacher {only_t[:5]}")
    bad = [k for k in student if student[k].shape != teacher[k].shape]
    if bad:
        raise ValueError(f"shapes differ for {bad[:5]}")
    out: dict[str, Tensor] = {}
    ranks = sorted({rank, *report_ranks})
    res2 = dict.fromkeys(ranks, 0.0)  # squared residual per rank, low-rank layers
    low2 = total2 = missing2 = skipped2 = actual2 = 0.0
    worst = ("", 0.0)
    lora_params = delta_params = 0
    skipped: list[str] = []
    for key in sorted(student):
        t = teacher[key]
        if t.is_floating_point() and t.dtype != student[key].dtype:  # e.g. a bf16 student vs an fp32 teacher:
            t = t.to(student[key].dtype)  # the teacher's rounding to that dtype is not part of the distillation
        d = student[key].to(device=device, dtype=torch.float64) - t.to(device=device, dtype=torch.float64)
        n2 = float(d.square().sum())
        if n2 == 0.0:
            continue
        total2 += n2
        delta_params += d.numel()
        if d.dim() == 2 and key.endswith(".weight") and min(d.shape) > 1:
            u, s, vh = torch.linalg.svd(d.to(svd_dtype), full_matrices=False)
            s2 = s.double().square()
            for r in ranks:
                res2[r] += float(s2[min(r, len(s)):].sum())
            r = min(rank, len(s))
            root = s[:r].sqrt()
            up, down = (u[:, :r] * root).to(dtype), (root[:, None] * vh[:r]).to(dtype)
            resid2 = float((d - up.double() @ down.double()).square().sum())  # as stored, rounding included
            actual2 += resid2
            worst = max(worst, (key, math.sqrt(resid2 / n2)), key=lambda x: x[1])
            base = LORA_PREFIX + key[: -len(".weight")]
            out[base + ".lora_up.weight"] = up.cpu()
            out[base + ".lora_down.weight"] = down.cpu()
            if alpha:
                out[base + ".alpha"] = torch.tensor(float(r))
            low2 += n2
            lora_params += r * sum(d.shape)
            continue
        takes = _is_linear_bias(key, student)  # diffusers applies this exact delta
        if diffs == "all" or (diffs == "diffusers" and takes):
            out[LORA_PREFIX + _diff_key(key)] = d.to(dtype).cpu()
            lora_params += d.numel()
            if not takes:
                skipped.append(LORA_PREFIX + _diff_key(key))
                skipped2 += n2
        else:
            missing2 += n2
    if not out:
        raise ValueError("student and teacher are identical: there is no delta to export")
    _zero_pairs_for_lone_biases(out, student, dtype, alpha)
    rel = lambda x, n: math.sqrt(x / n) if n > 0 else 0.0
    return LoraResult(state_dict=out, rank=rank, lowrank_error=rel(actual2, low2),
                      total_error=rel(actual2 + missing2, total2), worst_layer=worst,
                      errors_by_rank={r: rel(res2[r], low2) for r in ranks}, lora_params=lora_params,
                      delta_params=delta_params, diffusers_error=rel(actual2 + missing2 + skipped2, total2),
                      diffusers_skipped=skipped)


def _zero_pairs_for_lone_biases(out: dict[str, Tensor], student: dict[str, Tensor], dtype: torch.dtype,
                                alpha: bool) -> None:
    """A zero rank-1 LoRA pair for each Linear with a ``.diff_b`` but no pair (its weight did not change):
    diffusers attaches the bias delta to a LoRA layer and needs one there."""
    for key in [k for k in out if k.endswith(".diff_b")]:
        base = key[: -len(".diff_b")]
        w = student.get(base[len(LORA_PREFIX):] + ".weight")
        if w is not None and w.dim() == 2 and base + ".lora_up.weight" not in out:
            out[base + ".lora_up.weight"] = torch.zeros(w.shape[0], 1, dtype=dtype)
            out[base + ".lora_down.weight"] = torch.zeros(1, w.shape[1], dtype=dtype)
            if alpha:
                out[base + ".alpha"] = torch.tensor(1.0)


def export_lora(student: str | Path, teacher: str | Path, out: str | Path, rank: int, **kw) -> LoraResult:
    """Read both checkpoints, build the LoRA (:func:`lora_from_delta`) and write it (``.safetensors``,
    with the errors in its metadata, or ``.pth``)."""
    s, _ = ckpt_io.read(student)
    t, _ = ckpt_io.read(teacher)
    result = lora_from_delta(s, t, rank, **kw)
    meta = {"format": "Wan LoRA (ComfyUI / diffusers: diffusion_model.*.lora_up/lora_down[/alpha], .diff, .diff_b)",
            "rank": str(rank), "lowrank_relative_error": f"{result.lowrank_error:.6g}",
            "total_relative_error": f"{result.total_error:.6g}",
            "diffusers_relative_error": f"{result.diffusers_error:.6g}", "student": str(student),
            "teacher": str(teacher)}
    ckpt_io.write(result.state_dict, out, metadata=meta)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcm-export-lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="distilled student weights (any checkpoint format)")
    ap.add_argument("--teacher", required=True, help="the teacher it was distilled from")
    ap.add_argument("--out", required=True, help="output LoRA (.safetensors recommended)")
    ap.add_argument("--rank", type=int, required=True, help="LoRA rank of every Linear layer")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(ckpt_io.DTYPES), help="storage dtype")
    ap.add_argument("--diffs", choices=DIFFS, default="all",
                    help="exact deltas of the non-LoRA tensors to write: all (ComfyUI applies all; diffusers skips "
                         "modulation, patch embedding and norms), diffusers (only the Linear biases), none")
    ap.add_argument("--no_diffs", action="store_true", help="same as --diffs none")
    ap.add_argument("--alpha", action="store_true",
                    help="write <m>.alpha = rank keys (ComfyUI reads them; diffusers' Wan loader refuses them)")
    ap.add_argument("--report_ranks", default="", help="comma-separated ranks to report the error for")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the SVDs run")
    ap.add_argument("--svd_dtype", default="float32", choices=["float32", "float64"], help="SVD precision")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = [int(r) for r in args.report_ranks.split(",") if r.strip()]
    res = export_lora(args.student, args.teacher, args.out, args.rank, dtype=ckpt_io.DTYPES[args.dtype],
                      diffs="none" if args.no_diffs else args.diffs, alpha=args.alpha, report_ranks=report,
                      device=args.device, svd_dtype=ckpt_io.DTYPES[args.svd_dtype])
    summary = {"out": args.out, "rank": args.rank, "lowrank_relative_error": res.lowrank_error,
               "total_relative_error": res.total_error, "diffusers_relative_error": res.diffusers_error,
               "diffusers_skipped": res.diffusers_skipped, "worst_layer": list(res.worst_layer),
               "lora_params": res.lora_params, "delta_params": res.delta_params,
               "errors_by_rank": res.errors_by_rank}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"wrote {args.out}: rank {args.rank}, {len(res.state_dict)} tensors, {res.lora_params:,} values for a "
          f"delta of {res.delta_params:,}")
    print(f"relative reconstruction error (Frobenius): low-rank layers {res.lowrank_error:.4g}, whole delta "
          f"{res.total_error:.4g}; worst layer {res.worst_layer[0]} {res.worst_layer[1]:.4g}")
    if res.diffusers_skipped:
        names = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", k.removeprefix(LORA_PREFIX).rsplit(".", 1)[0])
                        for k in res.diffusers_skipped})
        print(f"diffusers skips {len(res.diffusers_skipped)} exact deltas ({', '.join(names)}): whole-delta error "
              f"as diffusers applies the file {res.diffusers_error:.4g} (--diffs diffusers leaves them out)")
    for r, e in res.errors_by_rank.items():
        print(f"  rank {r:>5}: low-rank relative error {e:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
