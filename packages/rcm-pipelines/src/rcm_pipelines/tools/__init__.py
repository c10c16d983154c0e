"""Checkpoint tools, installed as console commands: ``rcm-convert`` (.pth / .safetensors / DCP, with prefix and
dtype changes, verified bit for bit), ``rcm-inspect`` (keys, shapes, dtypes, a check against a known layout),
``rcm-export-ema`` (a part of a training checkpoint as weights), ``rcm-export-lora`` (student - teacher as a
LoRA) and ``rcm-export-diffusers`` (a DiT as a diffusers folder). Flags are snake_case, as the recipes'
(docs/tools.md).
"""
