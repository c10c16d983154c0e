"""umT5 tokenizer wrapper with Wan2.1's prompt cleaning, loaded from a local file or directory only.

The reference tokenizes with ``google/umt5-xxl`` after cleaning each prompt (ftfy ``fix_text``, HTML-unescape
twice, strip, collapse whitespace), appends ``</s>`` (id 1), pads with id 0 to ``max_length`` (512) and
truncates (docs/nets_encoders.md, umT5). Nothing is downloaded: ``path`` must be a local tokenizer directory or a
sentencepiece ``.model`` file.
Needs the ``tokenizer`` extra (``pip install 'rcm-nets[tokenizer]'``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Tokenizer", "clean_prompt"]

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan2.1 prompt cleaning: ftfy ``fix_text``, HTML-unescape twice, strip, collapse whitespace runs."""
    ftfy = _require("ftfy")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _require(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"rcm_nets.wan.Tokenizer needs {name!r}: pip install 'rcm-nets[tokenizer]'") from e


class _SentencePiece:
    """A sentencepiece ``.model`` used as the T5 (slow) tokenizer does: pieces, then ``</s>``."""

    def __init__(self, model: Path):
        spm = _require("sentencepiece")
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        self.eos_id, self.pad_id = self.sp.eos_id(), self.sp.pad_id()
        if self.eos_id < 0 or self.pad_id < 0:
            raise ValueError(f"{str(model)!r} defines no eos / pad piece (umT5 uses pad 0, eos 1)")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, batch: list[str], max_length: int | None) -> list[list[int]]:
        out = []
        for ids in self.sp.encode(batch):
            if max_length is not None:
                ids = ids[: max_length - 1]  # keep room for </s>, as T5 truncation does
            out.append([*ids, self.eos_id])
        return out


class _HuggingFace:
    """A local ``transformers`` tokenizer directory (``tokenizer.json`` + config), loaded offline."""

    def __init__(self, directory: Path):
        transformers = _require("transformers")
        self.hf = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if self.hf.pad_token_id is None:
            raise ValueError(f"tokenizer in {str(directory)!r} has no pad token (umT5 uses <pad> = 0)")
        self.pad_id, self.vocab_size = self.hf.pad_token_id, len(self.hf)

    def encode(self, batch: list[str], max_length: int | None) -> list[list[int]]:
        kw = {} if max_length is None else dict(truncation=True, max_length=max_length)
        return self.hf(batch, add_special_tokens=True, **kw)["input_ids"]


class Tokenizer:
    """Callable ``texts -> (ids [B, L], mask [B, L])`` (int64), padded to ``max_length`` and truncated.

    Args:
        path: a local tokenizer directory or a sentencepiece ``.model`` file. A directory with a
            ``tokenizer.json`` (what ``save_pretrained`` writes, e.g. a copy of ``google/umt5-xxl``) loads
            through ``transformers.AutoTokenizer`` with ``local_files_only=True``; otherwise its
            ``spiece.model`` (or the given ``.model`` file) is used directly through ``sentencepiece``.
        max_length: pad / truncate every prompt to this many tokens (``</s>`` included and kept on
            truncation); ``None`` pads only to the longest prompt of the batch and never truncates.
        clean: apply :func:`clean_prompt` first (the reference does).
    """

    def __init__(self, path: str | Path, max_length: int | None = 512, clean: bool = True):
        path = Path(path)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if path.is_dir() and (path / "tokenizer.json").is_file():
            self.backend: _SentencePiece | _HuggingFace = _HuggingFace(path)
        else:
            model = path / "spiece.model" if path.is_dir() else path
            if not model.is_file() or model.suffix != ".model":
                raise FileNotFoundError(
                    f"no tokenizer at {str(path)!r}: pass a local directory with tokenizer.json or spiece.model, "
                    "or a sentencepiece .model file (nothing is downloaded)")
            self.backend = _SentencePiece(model)
        self.max_length, self.clean = max_length, clean

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def pad_id(self) -> int:
        return self.backend.pad_id

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize one prompt or a batch: ``ids [B, L]`` (pad id 0, ``</s>`` last) and ``mask [B, L]``."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise TypeError("Tokenizer expects a string or a non-empty sequence of strings")
        if self.clean:
            batch = [clean_prompt(t) for t in batch]
        seqs = self.backend.encode(batch, self.max_length)
        length = self.max_length if self.max_length is not None else max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), length), dtype=torch.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
            mask[i, : len(s)] = 1
        return ids, mask
