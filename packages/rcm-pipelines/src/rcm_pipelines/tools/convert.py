"""Convert a checkpoint between ``.pth``, ``.safetensors`` and DCP, bit-exactly unless a dtype is asked for.

    rcm-convert Wan2.1-T2V-1.3B.pth Wan2.1-T2V-1.3B.safetensors
    rcm-convert Wan2.1-T2V-1.3B.pth Wan2.1-T2V-1.3B.dcp --add_prefix net.   # reference DCP
    rcm-convert run/checkpoints/rcm/iter_000001000 student.pth --strip_prefix student.

The source may be any format ``rcm_nets.checkpoint.read_state_dict`` reads (``.pth``/``.pt``, ``.safetensors``,
a sharded safetensors directory, a DCP directory); nested ``.pth`` dicts are flattened with dots, as DCP
does. The destination format comes from its suffix (``.dcp`` or no suffix: a DCP directory) or ``--to``.
``--verify`` reads the result back and checks every tensor bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ckpt_io

__all__ = ["convert", "main"]


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = None,
            strip_prefix: str | None = None, add_prefix: str = "", verify: bool = True) -> dict:
    """Convert ``src`` to ``dst``; returns ``{"tensors", "params", "src_format", "dst_format", "verified"}``."""
    sd, src_fmt = ckpt_io.read(src)
    if not sd:
        raise ValueError(f"{src} holds no tensor")
    if strip_prefix:
        sd = ckpt_io.strip_prefix(sd, strip_prefix)
    sd = {add_prefix + k: v for k, v in sd.items()}
    sd = ckpt_io.cast(sd, ckpt_io.DTYPES[dtype] if dtype else None)
    fmt = ckpt_io.format_of(dst, to)
    ckpt_io.write(sd, dst, fmt)
    verified = False
    if verify:
        back, _ = ckpt_io.read(dst)
        diff = sorted(set(back) ^ set(sd))
        bad = [k for k in sd if k in back and not ckpt_io.bitwise_equal(back[k], sd[k])]
        if diff or bad:
            raise RuntimeError(f"verification of {dst} failed: keys differing {diff[:5]}, tensors differing {bad[:5]}")
        verified = True
    return {"tensors": len(sd), "params": sum(v.numel() for v in sd.values()), "src_format": src_fmt,
            "dst_format": fmt, "verified": verified}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcm-convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="source checkpoint (.pth/.pt/.safetensors file, safetensors dir, DCP dir)")
    ap.add_argument("dst", help="destination (.pth/.pt, .safetensors, or a .dcp / suffix-less DCP directory)")
    ap.add_argument("--to", choices=["pth", "safetensors", "dcp"], help="destination format (default: suffix)")
    ap.add_argument("--dtype", choices=sorted(ckpt_io.DTYPES), help="cast floating tensors (default: keep bits)")
    ap.add_argument("--strip_prefix", help="remove this prefix from every key (e.g. net.)")
    ap.add_argument("--add_prefix", default="", help="prepend this to every key (e.g. net. for the reference DCP)")
    ap.add_argument("--no_verify", action="store_true", help="do not read the result back to compare bits")
    args = ap.parse_args(argv)
    info = convert(args.src, args.dst, to=args.to, dtype=args.dtype, strip_prefix=args.strip_prefix,
                   add_prefix=args.add_prefix, verify=not args.no_verify)
    print(f"{args.src} ({info['src_format']}) -> {args.dst} ({info['dst_format']}): {info['tensors']} tensors, "
          f"{info['params']:,} elements" + (", verified bit-exact" if info["verified"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
