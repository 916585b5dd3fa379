"""The tokenizers the project ships: its own character-level one, and CLIP's byte-pair one.

Both are ``transformers.CLIPTokenizer`` objects. The character-level tokenizer serves the seeded built-ins
(a randomly initialised text encoder needs nothing more); CLIP's is built from the vocabulary file in
``assets/clip_bpe`` (MIT, see its NOTICE) for real text encoders with CLIP's 49,408-token vocabulary.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

from .configs import CLIP_VOCAB_SIZE

ASSETS = Path(__file__).parent / "assets"
CLIP_BPE = ASSETS / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-character map (so every UTF-8 string tokenizes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def builtin_tokenizer():
    """The project's own tokenizer: a ``CLIPTokenizer`` over 514 tokens (256 bytes, their end-of-word forms,
    BOS, EOS), no merges, so every word becomes its characters."""
    from transformers import CLIPTokenizer

    folder = ASSETS / "char_tokenizer"
    if not (folder / "vocab.json").exists():  # written once, deterministic content
        folder.mkdir(parents=True, exist_ok=True)
        alphabet = byte_alphabet()
        vocab = {c: i for i, c in enumerate(alphabet)}
        vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        _atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        _atomic_write_text(folder / "merges.txt", "#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def clip_bpe_tokenizer(pad_token: str):
    """CLIP's tokenizer (the vocabulary of openai/clip-vit-large-patch14) from the shipped BPE merges.

    ``pad_token``: ``<|endoftext|>`` for CLIP ViT-L text encoders, ``!`` for OpenCLIP ones (SD-2.x, SDXL's second).
    """
    from transformers import CLIPTokenizer

    with gzip.open(CLIP_BPE, "rt", encoding="utf-8") as vocabulary:
        lines = vocabulary.read().split("\n")
    # CLIP's own cut: the vocabulary is 256 bytes, their end-of-word forms, 48,894 merges and 2 special tokens
    merges = lines[1: CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m.split()) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77,
                             pad_token=pad_token)
