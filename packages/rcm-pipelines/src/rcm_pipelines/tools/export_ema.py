"""Export the EMA student (or any part) of a training checkpoint as official-key weights.

    rcm-export-ema outputs/distill/1.3B-rcm/checkpoints/rcm rCM_1.3B.safetensors
    rcm-export-ema .../iter_000010000 student.pth --part student --dtype float32 --config t2v-1.3B

``CHECKPOINT`` is a DCP checkpoint directory written by ``rcm_train`` (an ``iter_*`` directory, or a root with a
``latest`` pointer, which is followed). Its parts are named ``student``, ``student_ema``, ``fake_score``, ...
(plus ``*_optim``, ``*_sched``, ``trainer``); the part's prefix is removed, so the keys are the network's
own (the official Wan keys). Floating tensors are cast to ``--dtype`` (bf16 by default, as the released
rCM students). ``--config`` checks the keys and shapes against a named layout before writing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ckpt_io

__all__ = ["resolve_checkpoint", "export", "main"]


def resolve_checkpoint(path: str | Path) -> Path:
    """An iteration directory: ``path`` itself if it holds a DCP ``.metadata``, else the one its ``latest``
    pointer names. Raises naming what is missing."""
    p = Path(path)
    if (p / ".metadata").is_file():
        return p
    pointer = p / "latest"
    if pointer.is_file():
        it = p / pointer.read_text().strip()
        if (it / ".metadata").is_file():
            return it
        raise FileNotFoundError(f"{pointer} names {it}, which is not a complete DCP checkpoint")
    raise FileNotFoundError(f"{p} is neither a DCP checkpoint directory (no .metadata) nor a checkpoint root "
                            "(no 'latest' pointer)")


def export(checkpoint: str | Path, out: str | Path, *, part: str = "student_ema", dtype: str | None = "bfloat16",
           config: str | None = None) -> dict:
    """Write ``part`` of ``checkpoint`` to ``out``; returns ``{"checkpoint", "tensors", "params"}``."""
    from rcm_nets.checkpoint import check_state_dict, read_dcp_part

    ckpt = resolve_checkpoint(checkpoint)
    sd = read_dcp_part(ckpt, part)
    if config is not None:
        module = ckpt_io.named_module(config)
        check_state_dict({k: v.shape for k, v in module.state_dict().items()}, sd, source=f"{ckpt} part {part!r}")
    sd = ckpt_io.cast(sd, ckpt_io.DTYPES[dtype] if dtype else None)
    ckpt_io.write(sd, out)
    return {"checkpoint": ckpt, "tensors": len(sd), "params": sum(v.numel() for v in sd.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcm-export-ema", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="DCP iteration directory or checkpoint root with a 'latest' pointer")
    ap.add_argument("out", help="output weights: .safetensors, .pth/.pt, or .dcp")
    ap.add_argument("--part", default="student_ema", help="checkpoint part to export (default student_ema)")
    ap.add_argument("--dtype", default="bfloat16", choices=[*sorted(ckpt_io.DTYPES), "keep"],
                    help="cast floating tensors (default bfloat16; keep = as stored)")
    ap.add_argument("--config", choices=ckpt_io.MODULE_NAMES, help="check keys/shapes against this layout first")
    args = ap.parse_args(argv)
    info = export(args.checkpoint, args.out, part=args.part, dtype=None if args.dtype == "keep" else args.dtype,
                  config=args.config)
    print(f"exported part {args.part!r} of {info['checkpoint']} -> {args.out}: {info['tensors']} tensors, "
          f"{info['params']:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
