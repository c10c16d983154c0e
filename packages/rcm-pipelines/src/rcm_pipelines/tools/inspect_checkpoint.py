"""Inspect a checkpoint: format, keys, shapes, dtypes, parameter count; optionally check it against a layout.

    rcm-inspect Wan2.1-T2V-1.3B.pth --config t2v-1.3B
    rcm-inspect run/checkpoints/rcm/iter_000001000 --keys --limit 50

Without ``--config``: a summary per top-level module (``blocks``, ``head``, ...) of tensor and parameter
counts, and the totals per dtype. With ``--config NAME`` (a WanDiT config, ``i2v-A14B``, ``vae``,
``umt5-xxl``, ``clip-vit-h-14``): a wrapper prefix (``net.``, ``visual.``, ...) is detected and stripped, then
every missing key, unexpected key and shape mismatch is listed; the exit status is 1 on any mismatch. A diffusers
``WanTransformer3DModel`` folder is checked under the official names (``rcm_nets.wan.diffusers_format``).

``--sha256`` prints the SHA-256 of a checkpoint file (read in 16 MiB pieces, so a 60 GB file needs no memory);
``--sha256 HEX`` (or ``--sha256 SUMS_FILE`` in the ``sha256sum`` format, the line naming this file's base name)
verifies it first, before the tensors are read, and exits with status 2 on a mismatch.

    rcm-inspect checkpoints/Wan2.1_VAE.pth --config vae --sha256 <64 hex digits>
    rcm-inspect checkpoints/Wan2.1_VAE.pth --sha256 checkpoints/SHA256SUMS
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

from rcm_nets.wan import diffusers_format as dfm

from . import ckpt_io

__all__ = ["inspect", "compare", "sha256", "expected_sha256", "main"]

_CHUNK = 16 * 2**20


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in pieces."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--sha256 needs a single file; {p} is {'a directory' if p.is_dir() else 'absent'}")
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def expected_sha256(spec: str, path: str | Path) -> str:
    """The digest ``spec`` gives for ``path``: 64 hex digits, or a ``sha256sum`` file whose line for the file's
    base name holds it."""
    if re.fullmatch(r"[0-9a-fA-F]{64}", spec):
        return spec.lower()
    sums = Path(spec)
    if not sums.is_file():
        raise ValueError(f"--sha256 {spec!r} is neither 64 hex digits nor a sha256sum file")
    name = Path(path).name
    for line in sums.read_text().splitlines():
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *]?(.+)", line.strip())
        if m and Path(m.group(2)).name == name:
            return m.group(1).lower()
    raise ValueError(f"{sums} has no sha256 line for {name}")


def inspect(path: str | Path) -> dict:
    """``{"format", "tensors", "params", "bytes", "dtypes": {dtype: params}, "modules": {top: params},
    "keys": {key: [shape, dtype]}}`` of a checkpoint."""
    sd, fmt = ckpt_io.read(path)
    dtypes: Counter = Counter()
    modules: Counter = Counter()
    for k, v in sd.items():
        dtypes[str(v.dtype).removeprefix("torch.")] += v.numel()
        modules[k.split(".", 1)[0]] += v.numel()
    return {"path": str(path), "format": fmt, "tensors": len(sd), "params": sum(v.numel() for v in sd.values()),
            "bytes": sum(v.numel() * v.element_size() for v in sd.values()), "dtypes": dict(dtypes),
            "modules": dict(modules),
            "keys": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()}}


def compare(info: dict, layout: str) -> dict:
    """Check the keys of ``info`` (from :func:`inspect`) against ``layout``: ``{"prefix", "missing",
    "unexpected", "mismatched", "expected_params", "ok"}``."""
    module = ckpt_io.named_module(layout)
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
    if dfm.is_diffusers_state_dict(info["keys"]) and not dfm.is_diffusers_state_dict(expected):
        info = {**info, "keys": dfm.state_dict_from_diffusers(info["keys"])}  # diffusers folder: official names
    keys = list(info["keys"])
    prefix = ckpt_io.detect_prefix(keys, set(expected))
    found = {k[len(prefix):]: info["keys"][k][0] for k in keys if k.startswith(prefix)}
    ignored = [k for k in keys if not k.startswith(prefix)]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(f"{k}: file {found[k]} vs {layout} {expected[k]}" for k in set(found) & set(expected)
                        if found[k] != expected[k])
    n = sum(math.prod(s) for s in expected.values())
    return {"layout": layout, "prefix": prefix, "ignored": ignored, "missing": missing, "unexpected": unexpected,
            "mismatched": mismatched, "expected_params": n, "ok": not (missing or unexpected or mismatched)}


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}T"


def _print(info: dict, check: dict | None, show_keys: bool, limit: int) -> None:
    print(f"{info['path']}: {info['format']}, {info['tensors']} tensors, {info['params']:,} parameters "
          f"({_human(info['params'])}), {info['bytes'] / 2**20:.1f} MiB")
    print("  by dtype:  " + ", ".join(f"{d} {_human(n)}" for d, n in sorted(info["dtypes"].items())))
    print("  by module: " + ", ".join(f"{m} {_human(n)}" for m, n in info["modules"].items()))
    if show_keys:
        for i, (k, (shape, dtype)) in enumerate(info["keys"].items()):
            if limit and i >= limit:
                print(f"  ... {info['tensors'] - limit} more")
                break
            print(f"  {k}  {shape}  {dtype}")
    if check is None:
        return
    pre = f" after stripping {check['prefix']!r}" if check["prefix"] else ""
    if check["ok"]:
        print(f"matches {check['layout']}{pre}: every key and shape ({check['expected_params']:,} parameters)")
    else:
        print(f"does NOT match {check['layout']}{pre}:")
        for title in ("missing", "unexpected", "mismatched"):
            items = check[title]
            if items:
                print(f"  {title} ({len(items)}): " + ", ".join(items[:limit or len(items)]))
    if check["ignored"]:
        print(f"  ignored (outside the prefix): {len(check['ignored'])} tensors, e.g. {check['ignored'][:3]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcm-inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="checkpoint file or directory (.pth/.safetensors/sharded safetensors/DCP)")
    ap.add_argument("--config", choices=ckpt_io.MODULE_NAMES, help="check keys and shapes against this layout")
    ap.add_argument("--keys", action="store_true", help="list every key with its shape and dtype")
    ap.add_argument("--limit", type=int, default=20, help="at most this many keys per listing (0: all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--sha256", nargs="?", const="", metavar="HEX_OR_SUMS",
                    help="print the file's SHA-256; with 64 hex digits or a sha256sum file, verify it (exit 2 if not)")
    args = ap.parse_args(argv)
    digest = None
    if args.sha256 is not None:
        want = expected_sha256(args.sha256, args.path) if args.sha256 else None
        digest = {"sha256": sha256(args.path), "expected": want}
        digest["ok"] = want is None or digest["sha256"] == want
        if not digest["ok"]:
            print(json.dumps({"path": args.path, **digest}) if args.json else
                  f"{args.path}: SHA-256 MISMATCH: file {digest['sha256']}, expected {want}")
            return 2
    info = inspect(args.path)
    if digest is not None:
        info["sha256"] = digest
        if not args.json:
            print(f"{args.path}: sha256 {digest['sha256']}" + (" (verified)" if digest["expected"] else ""))
    check = compare(info, args.config) if args.config else None
    if args.json:
        print(json.dumps({**info, **({"check": check} if check else {})}))
    else:
        _print(info, check, args.keys, args.limit)
    return 0 if check is None or check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
