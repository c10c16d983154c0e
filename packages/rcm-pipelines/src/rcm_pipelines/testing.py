"""A complete set of tiny, randomly initialised Wan components written in the official file formats.

Tests (and a user who wants to try the recipes without downloading 30 GB) run the real loading code on
these files: DiTs as ``.pth`` state dicts with the official keys (T2V "tiny", Wan2.1 I2V "tiny-i2v", two
Wan2.2-style I2V experts "tiny-i2v-A14B"), ``Wan2.1_VAE.pth``-style VAE, a bf16 umT5 ``.pth``, a
whole-CLIP ``.pth`` with ``visual.*`` / ``textual.*`` entries, a sentencepiece tokenizer trained on the fly
(~0.1 s; T5 ids pad 0 / eos 1 / unk 2), an input image and a prompt file.

The networks are random (their videos are noise); the DiT output heads are randomised too, so samplers
see non-zero velocities. Needs ``sentencepiece`` (the ``tokenizer`` extra).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from rcm_nets.wan import CLIPVisual, UMT5Encoder, WanDiT, WanVAE
from rcm_nets.wan.configs import get_config

__all__ = ["TinyAssets", "write_tiny_assets", "TINY_VAE", "TINY_T5", "TINY_CLIP", "train_tiny_tokenizer"]

TINY_VAE = {"dim": 4}
"""WanVAE arguments of the tiny VAE (channels 4-8-16-16, the released z_dim 16)."""
TINY_T5 = {"dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 2, "num_layers": 2}
"""UMT5Encoder arguments of the tiny encoder (width 32 = the tiny DiT's text_dim); vocab from the tokenizer."""
TINY_CLIP = {"image_size": 28, "patch_size": 14, "dim": 1280, "mlp_ratio": 0.25, "out_dim": 8, "num_heads": 16,
             "num_layers": 1}
"""CLIPVisual arguments of the tiny tower: width 1280 (what the I2V DiT's img_emb takes), 5 tokens, and one
block (the DiT uses all blocks but the last, so none run)."""

_WORDS = ("a cat dog runs over the green field under blue sky with clouds and birds flying fast slow red car "
          "camera pans across city street at night neon lights reflect on wet road").split()
PROMPTS = ("a red car drives along a wet road at night", "a cat runs across the green field",
           "birds flying under blue sky with clouds")


@dataclass(frozen=True)
class TinyAssets:
    """Paths of the files :func:`write_tiny_assets` wrote."""

    dir: Path
    t2v: Path
    """DiT config "tiny" (text_dim 32, text_len 16)."""
    i2v: Path
    """DiT config "tiny-i2v" (Wan2.1 I2V: CLIP branch, text_len 512)."""
    i2v_high: Path
    """DiT "tiny-i2v-A14B" high-noise expert (Wan2.2-style: 36 input channels, no CLIP)."""
    i2v_low: Path
    """Its low-noise expert."""
    vae: Path
    t5: Path
    tokenizer: Path
    """Directory holding spiece.model."""
    clip: Path
    image: Path
    prompts: Path
    t5_arch: dict
    """UMT5Encoder arguments of the tiny encoder (`TINY_T5` plus the tokenizer's vocabulary size)."""

    def component_flags(self) -> list[str]:
        """Command-line flags pointing generate.py / build_dataset.py at the tiny VAE and text encoder."""
        return [f"--vae.path={self.vae}", f"--vae.arch={json.dumps(TINY_VAE)}", f"--text_encoder.path={self.t5}",
                f"--text_encoder.tokenizer={self.tokenizer}", f"--text_encoder.arch={json.dumps(self.t5_arch)}"]


def train_tiny_tokenizer(out_dir: Path, *, vocab_size: int = 320, seed: int = 0) -> Path:
    """Train a unigram sentencepiece model with T5 ids into ``out_dir/spiece.model``; returns ``out_dir``."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_dir / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
        hard_vocab_limit=False, minloglevel=2)
    return out_dir


def _dit(name: str, g: torch.Generator, **overrides) -> WanDiT:
    net = WanDiT(get_config(name, **overrides))
    net.init_weights(generator=g)
    nn.init.normal_(net.head.head.weight, std=0.05, generator=g)  # a zero head would make every output 0
    return net


def write_tiny_assets(out_dir: str | Path, *, seed: int = 0) -> TinyAssets:
    """Write every tiny component into ``out_dir`` (created) and return their paths. Deterministic in ``seed``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # default initialisations below draw from the global RNG
        torch.manual_seed(seed)
        return _write(d, seed)


def _write(d: Path, seed: int) -> TinyAssets:
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for key, (name, kw) in {"t2v": ("tiny", {}), "i2v": ("tiny-i2v", {}), "i2v_high": ("tiny", {"in_dim": 36}),
                            "i2v_low": ("tiny", {"in_dim": 36})}.items():
        paths[key] = d / f"dit_{key}.pth"
        torch.save(_dit(name, g, **kw).state_dict(), paths[key])
    vae = WanVAE(**TINY_VAE)
    paths["vae"] = d / "Wan2.1_VAE.pth"
    torch.save(vae.state_dict(), paths["vae"])
    tok = train_tiny_tokenizer(d / "tokenizer", seed=seed)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok / "spiece.model")).get_piece_size()
    t5 = UMT5Encoder(vocab=vocab, **TINY_T5)
    paths["t5"] = d / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, paths["t5"])
    clip = CLIPVisual(**TINY_CLIP)
    whole = {f"visual.{k}": v for k, v in clip.state_dict().items()}
    whole |= {"textual.token_embedding.weight": torch.randn(4, 8, generator=g), "log_scale": torch.tensor(4.6)}
    paths["clip"] = d / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(whole, paths["clip"])
    rng = np.random.default_rng(seed)
    paths["image"] = d / "image.png"
    Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(paths["image"])
    paths["prompts"] = d / "prompts.txt"
    paths["prompts"].write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return TinyAssets(dir=d, tokenizer=tok, t5_arch={**TINY_T5, "vocab": vocab}, **paths)


def _main() -> None:
    """``python -m rcm_pipelines.testing [DIR]``: write the assets and print a tiny end-to-end run."""
    import shlex
    import sys

    a = write_tiny_assets(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny_assets")
    flags = " ".join(shlex.quote(f) for f in a.component_flags())
    size = "--size='[32,32]' --num_frames=5 --device=cpu"
    print(f"wrote the tiny assets to {a.dir}; a tiny pipeline on the CPU:\n"
          f"uv run recipes/build_dataset.py --dit.config=tiny --dit.path={a.t2v} --prompt_file={a.prompts} "
          f"--repeat=4 --samples_per_shard=4 --num_steps=8 --output_dir=outputs/tiny_dataset {size} "
          f"{' '.join(shlex.quote(f) for f in a.component_flags()[2:])}\n"
          f"uv run recipes/distill.py --preset=tiny-rcm --model.path={a.t2v} "
          f"--sample.vae.path={a.vae}\n"
          f"uv run recipes/generate.py --dit.config=tiny --dit.path=outputs/distill/tiny-rcm/student_ema.safetensors "
          f"--output=outputs/tiny_generate/video.mp4 {size} {flags}")


if __name__ == "__main__":
    _main()
