"""Export a Wan DiT (a distilled student, a teacher) as a diffusers ``WanTransformer3DModel`` folder.

    rcm-export-diffusers --student rCM_Wan2.1_T2V_1.3B_480p.pt --config t2v-1.3B --out rcm_1.3B_diffusers
    rcm-export-diffusers --student student.pth --config tiny --out out_dir --max_shard_gb 2 --dtype bfloat16

The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``, or, when the weights exceed
``--max_shard_gb``, shards ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` named by
``diffusion_pytorch_model.safetensors.index.json`` (the layout diffusers' ``save_pretrained`` writes and
``WanTransformer3DModel.from_pretrained`` reads); weight files of an earlier export in the folder are removed. Keys and config follow ``rcm_nets.wan.diffusers_format``.
The student is read strictly against ``--config`` (a ``net.`` / ``net_ema.`` prefix is stripped; a diffusers
folder is read too); values are written unchanged unless ``--dtype`` is given. ``text_len`` has no diffusers
field: diffusers' pipelines pad the text to 512 rows, as the released Wan models do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import Tensor

from rcm_nets.wan import diffusers_format as dfm

from ..components import DiTSpec, dit_config, read_dit_state_dict
from . import ckpt_io

__all__ = ["export_diffusers", "shard", "main"]


def shard(sd: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Split ``sd`` (in key order) into consecutive groups of at most ``max_bytes`` each (a tensor larger than
    that gets a group of its own)."""
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += n
    return groups


def export_diffusers(student: str | Path, out: str | Path, *, config: str = "t2v-1.3B", dtype: str | None = None,
                     max_shard_gb: float = 10.0) -> dict:
    """Write ``student`` (architecture ``config``: a named config or a config.json) as a diffusers folder
    ``out``; returns ``{"out", "files", "tensors", "params"}``."""
    if max_shard_gb <= 0:
        raise ValueError(f"max_shard_gb must be > 0, got {max_shard_gb}")
    cfg = dit_config(DiTSpec(config=config))
    sd = read_dit_state_dict(cfg, str(student), field="student", log=None)
    sd = dfm.state_dict_to_diffusers(ckpt_io.cast(sd, ckpt_io.DTYPES[dtype] if dtype else None))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = dfm.DIFFUSERS_WEIGHTS.removesuffix(".safetensors")
    for old in [*out.glob(f"{stem}*.safetensors"), out / dfm.DIFFUSERS_INDEX]:  # a previous export's files
        old.unlink(missing_ok=True)
    groups = shard(sd, int(max_shard_gb * 2**30))
    meta = {"format": "pt"}  # what diffusers' own safetensors files carry
    if len(groups) == 1:
        files = [ckpt_io.write(groups[0], out / dfm.DIFFUSERS_WEIGHTS, metadata=meta).name]
    else:
        files = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        weight_map = {}
        for name, group in zip(files, groups):
            ckpt_io.write(group, out / name, metadata=meta)
            weight_map.update(dict.fromkeys(group, name))
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / dfm.DIFFUSERS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                      indent=2))
    (out / "config.json").write_text(json.dumps(dfm.config_to_diffusers(cfg), indent=2) + "\n")
    return {"out": str(out), "files": files, "tensors": len(sd), "params": sum(v.numel() for v in sd.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcm-export-diffusers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="DiT weights (any checkpoint format, official or diffusers keys)")
    ap.add_argument("--config", default="t2v-1.3B",
                    help="its architecture: a named config (t2v-1.3B, t2v-14B, i2v-14B, tiny, ...) or a config.json")
    ap.add_argument("--out", required=True, help="output folder (config.json + safetensors)")
    ap.add_argument("--dtype", choices=sorted(ckpt_io.DTYPES), help="cast floating tensors (default: unchanged)")
    ap.add_argument("--max_shard_gb", type=float, default=10.0, help="largest safetensors file, in GiB")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    res = export_diffusers(args.student, args.out, config=args.config, dtype=args.dtype,
                           max_shard_gb=args.max_shard_gb)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"wrote {res['out']}: config.json + {len(res['files'])} safetensors file(s), {res['tensors']} tensors, "
              f"{res['params']:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
