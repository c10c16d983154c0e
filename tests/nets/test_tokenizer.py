"""Tokenizer: the real loading code on a tiny umT5-style sentencepiece model that the test trains itself.

No umT5 ``spiece.model`` ships in any package and the hub is unreachable, so a module fixture trains a
unigram model (T5 ids: pad 0, eos 1, unk 2, byte fallback) in ~0.05 s, and writes it three ways: a bare
``.model`` file, a directory with ``spiece.model``, and a ``transformers`` directory with ``tokenizer.json``
(built with the ``tokenizers`` library from the same pieces and scores). The reference for the ids is
``sentencepiece`` itself on the cleaned text, plus ``</s>``.
"""

import random

import pytest
import torch

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")
pytest.importorskip("ftfy")

from rcm_nets.wan import Tokenizer, UMT5Encoder  # noqa: E402
from rcm_nets.wan.tokenizer import clean_prompt  # noqa: E402

WORDS = ("a cat dog runs over the green field under blue sky with clouds and birds flying fast slow red car "
         "camera pans across city street at night neon lights reflect on wet road").split()


@pytest.fixture(scope="module")
def tok_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("umt5_tiny")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "spiece"), vocab_size=320, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    file_dir = d / "spm_dir"
    file_dir.mkdir()
    (file_dir / "spiece.model").write_bytes((d / "spiece.model").read_bytes())
    hf_dir = d / "hf_dir"
    _write_hf_tokenizer(d / "spiece.model", hf_dir)
    return {"spm_file": d / "spiece.model", "spm_dir": file_dir, "hf_dir": hf_dir}


def _write_hf_tokenizer(model_file, out_dir):
    """A T5-style fast tokenizer (Metaspace + Unigram with byte fallback + ``</s>``) from the same pieces."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    raw = RawTokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", sp.eos_id())])
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out_dir))


def _reference(tok_paths, texts, max_length):
    """sentencepiece on the cleaned text + ``</s>``, truncated keeping ``</s>``, right-padded with 0."""
    sp = spm.SentencePieceProcessor(model_file=str(tok_paths["spm_file"]))
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        seq = sp.encode(clean_prompt(t))[: max_length - 1] + [1]
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    return ids, mask


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b\n\t\tc   ") == "a & b c"  # double unescape, whitespace collapsed
    assert clean_prompt("cafÃ©  â€œquotedâ€\x9d") == 'café "quoted"'  # ftfy repairs mojibake and quotes
    assert clean_prompt("x &lt;y&gt;") == "x <y>"


TEXTS = ["A cat  &amp;amp; a dog\n\t run across   the street at night",
         "neon lights reflect on wet road, café ☃",
         ""]


@pytest.mark.parametrize("kind", ["hf_dir", "spm_dir", "spm_file"])
def test_ids_and_mask_match_sentencepiece(tok_paths, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = Tokenizer(tok_paths[kind], max_length=24)
    ids, mask = tok(TEXTS)
    ref_ids, ref_mask = _reference(tok_paths, TEXTS, 24)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (3, 24)
    torch.testing.assert_close(ids, ref_ids, atol=0, rtol=0)
    torch.testing.assert_close(mask, ref_mask, atol=0, rtol=0)
    assert mask[2].sum() == 1 and ids[2, 0] == 1  # an empty prompt is just </s>
    assert tok.pad_id == 0 and tok.vocab_size == spm.SentencePieceProcessor(
        model_file=str(tok_paths["spm_file"])).get_piece_size()


@pytest.mark.parametrize("kind", ["hf_dir", "spm_file"])
def test_truncation_keeps_eos(tok_paths, kind):
    long_text = " ".join(WORDS * 3)
    tok = Tokenizer(tok_paths[kind], max_length=10)
    ids, mask = tok([long_text, "a cat"])
    ref_ids, _ = _reference(tok_paths, [long_text, "a cat"], 10)
    assert mask[0].all() and ids[0, -1] == 1
    torch.testing.assert_close(ids, ref_ids, atol=0, rtol=0)
    # one string is a batch of one; max_length=None pads to the longest prompt and never truncates
    one, _ = tok(long_text)
    assert one.shape == (1, 10)
    free_ids, free_mask = Tokenizer(tok_paths[kind], max_length=None)([long_text, "a cat"])
    assert free_ids.shape[1] == free_mask[0].sum() > 10 and free_mask[1].sum() < free_ids.shape[1]


def test_clean_switch(tok_paths):
    raw = Tokenizer(tok_paths["spm_file"], max_length=16, clean=False)("a &amp;amp; cat")[0]
    cleaned = Tokenizer(tok_paths["spm_file"], max_length=16)("a &amp;amp; cat")[0]
    assert not torch.equal(raw, cleaned)


def test_tokens_to_text_embedding(tok_paths):
    """Tokenizer → UMT5Encoder: ``[B, max_length, dim]`` with the rows past each prompt's length zero."""
    tok = Tokenizer(tok_paths["spm_dir"], max_length=20)
    enc = UMT5Encoder(vocab=tok.vocab_size, dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=1).eval()
    ids, mask = tok(TEXTS[:2])
    with torch.no_grad():
        emb = enc(ids, mask)
    assert emb.shape == (2, 20, 16)
    for b in range(2):
        n = int(mask[b].sum())
        assert torch.all(emb[b, n:] == 0) and torch.all(emb[b, :n].abs().sum(-1) > 0)


def test_missing_or_unsupported_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        Tokenizer(tmp_path)  # an empty directory: no tokenizer.json, no spiece.model
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        Tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(tmp_path, max_length=0)
