"""The Wan2.1 DiT in the diffusers layout (``WanTransformer3DModel``): key and config mapping, both directions.

A diffusers ``save_pretrained`` folder holds ``config.json`` (constructor arguments of
``WanTransformer3DModel``) and ``diffusion_pytorch_model.safetensors`` (or shards named by
``diffusion_pytorch_model.safetensors.index.json``). The network is the same as ``WanDiT``: every tensor keeps
its shape and values, only module names differ, so the mapping is a pure rename. Nothing here imports
diffusers (it is a test-only dependency).

Module names, official (``WanDiT``) -> diffusers; inside ``blocks.<i>.``:

==========================  =========================================  ===================================
official                    diffusers                                  note
==========================  =========================================  ===================================
modulation                  scale_shift_table                          ``[1, 6, D]``
self_attn.{q,k,v,o}         attn1.{to_q,to_k,to_v,to_out.0}
self_attn.norm_{q,k}        attn1.norm_{q,k}                           RMSNorm over the full D
cross_attn.{q,k,v,o}        attn2.{to_q,to_k,to_v,to_out.0}
cross_attn.norm_{q,k}       attn2.norm_{q,k}
cross_attn.{k,v}_img        attn2.add_{k,v}_proj                       i2v
cross_attn.norm_k_img       attn2.norm_added_k                         i2v
norm3                       norm2                                      affine LN before cross-attention
ffn.0 / ffn.2               ffn.net.0.proj / ffn.net.2
==========================  =========================================  ===================================

Outside the blocks: ``patch_embedding`` keeps its name; ``text_embedding.{0,2}`` ->
``condition_embedder.text_embedder.linear_{1,2}``; ``time_embedding.{0,2}`` ->
``condition_embedder.time_embedder.linear_{1,2}``; ``time_projection.1`` -> ``condition_embedder.time_proj``;
``head.head`` -> ``proj_out``; ``head.modulation`` -> ``scale_shift_table``; i2v ``img_emb.proj.{0,1,3,4}`` ->
``condition_embedder.image_embedder.{norm1, ff.net.0.proj, ff.net.2, norm2}``. (The parameter-free LayerNorms
are ``norm1`` / ``norm2`` / ``head.norm`` in ours and ``norm1`` / ``norm3`` / ``norm_out`` in diffusers.)

Config: diffusers stores ``num_attention_heads`` and ``attention_head_dim`` (D = their product),
``in_channels`` / ``out_channels``, ``qk_norm`` as ``"rms_norm_across_heads"`` or null, and marks the i2v
image branch with ``image_dim = 1280`` and ``added_kv_proj_dim = D``. It has no text length: diffusers'
pipelines pad the umT5 output to 512 rows, so ``text_len`` defaults to 512 (pass it to change).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from .configs import WanConfig

__all__ = ["DIFFUSERS_CLASS", "DIFFUSERS_WEIGHTS", "DIFFUSERS_INDEX", "key_to_diffusers", "key_from_diffusers",
           "state_dict_to_diffusers", "state_dict_from_diffusers", "is_diffusers_state_dict", "is_diffusers_config",
           "config_to_diffusers", "config_from_diffusers", "read_config"]

DIFFUSERS_CLASS = "WanTransformer3DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""File name of unsharded weights in a diffusers folder (shards: ``diffusion_pytorch_model-0000i-of-0000n``)."""
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"

_CLIP_DIM = 1280  # width of the CLIP ViT-H/14 tokens that the i2v image branch takes
_ROPE_POSITIONS = 1024  # positions of the RoPE table (diffusers' rope_max_seq_len)

_BLOCK_MODULES = {
    "modulation": "scale_shift_table",
    **{f"self_attn.{a}": f"attn1.{b}" for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    **{f"cross_attn.{a}": f"attn2.{b}" for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                                                    ("k_img", "add_k_proj"), ("v_img", "add_v_proj"),
                                                    ("norm_k_img", "norm_added_k"))},
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}


def _rename(key: str, block_map: dict[str, str], top_map: dict[str, str]) -> str:
    """``key`` with its module path renamed by the longest matching entry (a whole parameter name, such as
    ``modulation``, matches too); ``KeyError`` when nothing matches."""
    head, rest, table = "", key, top_map
    parts = key.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        head, rest, table = f"blocks.{parts[1]}.", ".".join(parts[2:]), block_map
    for src in sorted(table, key=len, reverse=True):
        if rest == src or rest.startswith(src + "."):
            return head + table[src] + rest[len(src):]
    raise KeyError(key)


_BLOCK_INV = {v: k for k, v in _BLOCK_MODULES.items()}
_TOP_INV = {v: k for k, v in _TOP_MODULES.items()}


def key_to_diffusers(key: str) -> str:
    """The diffusers name of an official ``WanDiT`` state-dict key (``blocks.0.ffn.0.weight`` ->
    ``blocks.0.ffn.net.0.proj.weight``)."""
    return _rename(key, _BLOCK_MODULES, _TOP_MODULES)


def key_from_diffusers(key: str) -> str:
    """The official name of a diffusers ``WanTransformer3DModel`` state-dict key (inverse of
    :func:`key_to_diffusers`)."""
    return _rename(key, _BLOCK_INV, _TOP_INV)


def _convert(sd: dict[str, Tensor], fn, what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in sd.items():
        try:
            out[fn(k)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not part of the {what} Wan DiT layout, e.g. {sorted(unknown)[:8]}")
    return out


def state_dict_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official keys -> diffusers keys (same tensors, no copy). Raises listing keys it cannot map."""
    return _convert(sd, key_to_diffusers, "official")


def state_dict_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers keys -> official keys (same tensors, no copy). Raises listing keys it cannot map (e.g. the
    FLF2V ``pos_embed``, which ``WanDiT`` does not have)."""
    return _convert(sd, key_from_diffusers, "diffusers")


def is_diffusers_state_dict(keys) -> bool:
    """Whether the keys are those of a diffusers Wan transformer (its ``proj_out`` and ``condition_embedder``)."""
    keys = set(keys)
    return "proj_out.weight" in keys and "condition_embedder.time_proj.weight" in keys


# ------------------------------------------------------------------------------------------ config
_DIFFUSERS_FIELDS = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
                     "image_dim", "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len"}


def is_diffusers_config(config: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` is a diffusers one (its class name, or its field names)."""
    return config.get("_class_name") == DIFFUSERS_CLASS or "num_attention_heads" in config


def config_to_diffusers(cfg: WanConfig) -> dict[str, Any]:
    """The ``config.json`` of the diffusers ``WanTransformer3DModel`` equal to ``cfg`` (``text_len`` and
    ``precision`` have no diffusers field and are dropped)."""
    i2v = cfg.model_type == "i2v"
    return {"_class_name": DIFFUSERS_CLASS, "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
            "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
            "eps": cfg.eps, "image_dim": _CLIP_DIM if i2v else None, "added_kv_proj_dim": cfg.dim if i2v else None,
            "rope_max_seq_len": _ROPE_POSITIONS, "pos_embed_seq_len": None}


def config_from_diffusers(config: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> WanConfig:
    """The :class:`WanConfig` of a diffusers ``config.json`` (parsed), with ``WanConfig`` fields replaced by
    ``overrides`` (e.g. ``text_len``). Raises one line naming ``source`` and the field it cannot take."""
    c = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(c) - _DIFFUSERS_FIELDS)
    if unknown:
        raise ValueError(f"{source}: fields {unknown} are not WanTransformer3DModel arguments this loader knows")
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ValueError(f"{source}: _class_name {config['_class_name']!r} is not {DIFFUSERS_CLASS}")
    if c.get("pos_embed_seq_len") is not None:
        raise ValueError(f"{source}: pos_embed_seq_len={c['pos_embed_seq_len']} (FLF2V image positions) is not "
                         "supported by WanDiT")
    if c.get("rope_max_seq_len", _ROPE_POSITIONS) != _ROPE_POSITIONS:
        raise ValueError(f"{source}: rope_max_seq_len={c['rope_max_seq_len']}, WanDiT's RoPE table has "
                         f"{_ROPE_POSITIONS} positions")
    qk = c.get("qk_norm", "rms_norm_across_heads")
    if qk not in (None, "rms_norm_across_heads"):
        raise ValueError(f"{source}: qk_norm={qk!r}; WanDiT has 'rms_norm_across_heads' or none (null)")
    heads, head_dim = c.get("num_attention_heads", 40), c.get("attention_head_dim", 128)
    dim = heads * head_dim
    image_dim, added = c.get("image_dim"), c.get("added_kv_proj_dim")
    if image_dim not in (None, _CLIP_DIM) or (image_dim is None) != (added is None) or added not in (None, dim):
        raise ValueError(f"{source}: image_dim={image_dim}, added_kv_proj_dim={added}; the i2v image branch needs "
                         f"image_dim={_CLIP_DIM} and added_kv_proj_dim={dim} (t2v: both null)")
    in_dim = c.get("in_channels", 16)
    fields = dict(dim=dim, num_heads=heads, ffn_dim=c.get("ffn_dim", 13824), num_layers=c.get("num_layers", 40),
                  model_type="i2v" if image_dim else "t2v", patch_size=tuple(c.get("patch_size", (1, 2, 2))),
                  in_dim=in_dim, out_dim=c.get("out_channels") or in_dim, text_dim=c.get("text_dim", 4096),
                  freq_dim=c.get("freq_dim", 256), qk_norm=qk is not None,
                  cross_attn_norm=c.get("cross_attn_norm", True), eps=c.get("eps", 1e-6))
    try:
        return WanConfig.model_validate({**fields, **overrides})
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def read_config(path: str | Path, **overrides: Any) -> WanConfig:
    """The :class:`WanConfig` of a ``config.json`` (or a folder holding one), official or diffusers."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        config = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the DiT config {p}: {err}") from err
    if is_diffusers_config(config):
        return config_from_diffusers(config, source=str(p), **overrides)
    return WanConfig.from_official(config, **overrides)
