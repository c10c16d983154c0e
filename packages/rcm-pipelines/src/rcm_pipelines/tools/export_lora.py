"""Export a distilled student as a LoRA delta against its teacher, in the Wan LoRA layout of ComfyUI / diffusers.

    rcm-export-lora --student rCM_1.3B.safetensors --teacher Wan2.1-T2V-1.3B.pth \\
        --rank 64 --out rcm_1.3B_lora_r64.safetensors --report_ranks 16,32,64,128,256

Layout (keys prefixed ``diffusion_model.``, the official Wan module names; what ComfyUI's LoRA loader and
diffusers' ``WanPipeline.load_lora_weights`` read):

* every 2-D ``.weight`` (the Linear layers: attention q/k/v/o, FFN, text/time embeddings, head): the best
  rank-``r`` approximation of ``dW = W_student - W_teacher`` from its SVD ``U S V^T``, as
  ``<m>.lora_up.weight = U_r sqrt(S_r)`` ``[out, r]``, ``<m>.lora_down.weight = sqrt(S_r) V_r^T`` ``[r, in]``
  and ``<m>.alpha = r`` (scale ``alpha / r = 1``: ``W = W_teacher + up @ down``);
* every other tensor that changed, exactly: ``<m>.diff_b`` for biases, ``<m>.diff`` for other weights
  (norms, modulation tables, the Conv3d patch embedding) and ``<key>.diff`` for parameters that are not
  ``.weight`` / ``.bias`` (``blocks.N.modulation``). ``--no_diffs`` leaves them out (diffusers ignores
  non-bias ``.diff`` keys anyway; ComfyUI applies them).

The reconstruction error is reported as a relative Frobenius norm: over the low-rank layers
(``||dW - up @ down|| / ||dW||`` with ``up`` / ``down`` as stored, so the storage rounding counts) and over
the whole network delta (``.diff`` tensors count as exact; with ``--no_diffs`` as missing);
``--report_ranks`` lists the optimal error of other ranks from the same SVDs (discarded singular values).
The numbers go into the file's safetensors metadata too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import ckpt_io

__all__ = ["LoraResult", "lora_from_delta", "export_lora", "main", "LORA_PREFIX"]

LORA_PREFIX = "diffusion_model."


@dataclass
class LoraResult:
    """The LoRA state dict and its reconstruction errors."""

    state_dict: dict[str, Tensor]
    rank: int
    lowrank_error: float
    """||dW - up@down|| / ||dW|| over all low-rank layers together (Frobenius), with up / down as stored."""
    total_error: float
    """The same over every tensor of the network delta (diffs exact, or dropped with --no_diffs)."""
    worst_layer: tuple[str, float]
    """Low-rank layer with the largest relative error, and that error."""
    errors_by_rank: dict[int, float] = field(default_factory=dict)
    """For each report rank (and ``rank``): the optimal low-rank error from the discarded singular values
    (before storage rounding)."""
    lora_params: int = 0
    delta_params: int = 0


def _unwrap(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip a wrapper prefix (``net.``, ``net_ema.``, ...) that every key carries."""
    for p in ckpt_io.WRAPPER_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def _diff_key(key: str) -> str:
    if key.endswith(".bias"):
        return key[: -len(".bias")] + ".diff_b"
    if key.endswith(".weight"):
        return key[: -len(".weight")] + ".diff"
    return key + ".diff"


def lora_from_delta(student: dict[str, Tensor], teacher: dict[str, Tensor], rank: int, *,
                    dtype: torch.dtype = torch.bfloat16, diffs: bool = True, report_ranks: list[int] = (),
                    device: str | torch.device = "cpu", svd_dtype: torch.dtype = torch.float32) -> LoraResult:
    """LoRA (``diffusion_model.*`` keys) of ``student - teacher`` at ``rank``; see the module docstring.

    Both dicts must have the same keys and shapes (module keys; wrapper prefixes are stripped). A teacher
    tensor in another dtype than the student's is first rounded to the student's. Tensors that did not
    change produce no key. Each matrix uses rank ``min(rank, out, in)``; at full rank the
    reconstruction is exact up to the SVD's rounding (``svd_dtype``) and the storage ``dtype``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
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
    low2 = total2 = exact_missing2 = actual2 = 0.0
    worst = ("", 0.0)
    lora_params = delta_params = 0
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
            out[base + ".alpha"] = torch.tensor(float(r))
            low2 += n2
            lora_params += r * sum(d.shape)
        elif diffs:
            out[LORA_PREFIX + _diff_key(key)] = d.to(dtype).cpu()
            lora_params += d.numel()
        else:
            exact_missing2 += n2
    if not out:
        raise ValueError("student and teacher are identical: there is no delta to export")
    rel = lambda x, n: math.sqrt(x / n) if n > 0 else 0.0
    return LoraResult(state_dict=out, rank=rank, lowrank_error=rel(actual2, low2),
                      total_error=rel(actual2 + exact_missing2, total2), worst_layer=worst,
                      errors_by_rank={r: rel(res2[r], low2) for r in ranks}, lora_params=lora_params,
                      delta_params=delta_params)


def export_lora(student: str | Path, teacher: str | Path, out: str | Path, rank: int, **kw) -> LoraResult:
    """Read both checkpoints, build the LoRA (:func:`lora_from_delta`) and write it (``.safetensors``,
    with the errors in its metadata, or ``.pth``)."""
    s, _ = ckpt_io.read(student)
    t, _ = ckpt_io.read(teacher)
    result = lora_from_delta(s, t, rank, **kw)
    meta = {"format": "Wan LoRA (ComfyUI / diffusers: diffusion_model.*.lora_up/lora_down/alpha, .diff, .diff_b)",
            "rank": str(rank), "lowrank_relative_error": f"{result.lowrank_error:.6g}",
            "total_relative_error": f"{result.total_error:.6g}", "student": str(student), "teacher": str(teacher)}
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
    ap.add_argument("--no_diffs", action="store_true", help="leave out the exact deltas of non-Linear tensors")
    ap.add_argument("--report_ranks", default="", help="comma-separated ranks to report the error for")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the SVDs run")
    ap.add_argument("--svd_dtype", default="float32", choices=["float32", "float64"], help="SVD precision")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = [int(r) for r in args.report_ranks.split(",") if r.strip()]
    res = export_lora(args.student, args.teacher, args.out, args.rank, dtype=ckpt_io.DTYPES[args.dtype],
                      diffs=not args.no_diffs, report_ranks=report, device=args.device,
                      svd_dtype=ckpt_io.DTYPES[args.svd_dtype])
    summary = {"out": args.out, "rank": args.rank, "lowrank_relative_error": res.lowrank_error,
               "total_relative_error": res.total_error, "worst_layer": list(res.worst_layer),
               "lora_params": res.lora_params, "delta_params": res.delta_params,
               "errors_by_rank": res.errors_by_rank}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"wrote {args.out}: rank {args.rank}, {len(res.state_dict)} tensors, {res.lora_params:,} values for a "
          f"delta of {res.delta_params:,}")
    print(f"relative reconstruction error (Frobenius): low-rank layers {res.lowrank_error:.4g}, whole delta "
          f"{res.total_error:.4g}; worst layer {res.worst_layer[0]} {res.worst_layer[1]:.4g}")
    for r, e in res.errors_by_rank.items():
        print(f"  rank {r:>5}: low-rank relative error {e:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
