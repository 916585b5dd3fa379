"""A CLIP-style BPE tokenizer for the proxy's closed vocabulary.

``vocab.json`` holds CLIP's 512 byte-level characters (plain and ``</w>`` forms, so any text tokenizes), the
merge-chain intermediates, one token per caption word (``circle</w>``, ...), and ``<|startoftext|>`` /
``<|endoftext|>``. ``merges.txt`` builds every word left to right; the rank order is chosen (and checked) so
that each vocabulary word becomes exactly one token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..tokenization import byte_alphabet
from .shapes import VOCABULARY

MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _chain(word: str) -> list[tuple[str, str]]:
    sym = list(word[:-1]) + [word[-1] + "</w>"]
    merges, cur = [], sym[0]
    for s in sym[1:]:
        merges.append((cur, s))
        cur = cur + s
    return merges


def _bpe(word: str, ranks: dict) -> list[str]:
    """Reference BPE (CLIP's algorithm) for the self-check."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        r, i = min(pairs)
        if r == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_vocab(words=VOCABULARY) -> tuple[dict, list]:
    """``(vocab, merges)`` such that every word in ``words`` is a single token."""
    words = sorted(set(words), key=lambda w: (-len(w), w))  # long words' chains take precedence
    for attempt in range(len(words) ** 2 + 1):
        order = words if attempt == 0 else words[attempt % len(words):] + words[:attempt % len(words)]
        merges: list = []
        for w in order:
            for m in _chain(w):
                if m not in merges:
                    merges.append(m)
        ranks = {m: i for i, m in enumerate(merges)}
        if all(len(_bpe(w, ranks)) == 1 for w in words):
            break
    else:  # pragma: no cover
        raise RuntimeError("no merge order makes every word one token")
    alphabet = byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tokenizer_files(folder) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    for name, text in (("vocab.json", json.dumps(vocab, ensure_ascii=False)),
                       ("merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))):
        tmp = folder / f"{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return folder / "vocab.json", folder / "merges.txt"


def build_tokenizer(folder):
    """Write the files into ``folder`` and return a ``transformers.CLIPTokenizer`` over them."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(folder)
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MODEL_MAX_LENGTH)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    """Every vocabulary word is one token; BOS/EOS wrap a caption; padding uses EOS (as SD-1.x)."""
    for w in VOCABULARY:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1 or tok.convert_ids_to_tokens(ids)[0] != w + "</w>":
            raise AssertionError(f"word {w!r} tokenizes to {tok.convert_ids_to_tokens(ids)}")
    ids = tok("a small red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    bos, eos = tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids(EOS)
    if ids[0] != bos or ids[5] != eos or len(ids) != MODEL_MAX_LENGTH or tok.pad_token_id != eos:
        raise AssertionError(f"unexpected special-token layout {ids[:8]} (pad {tok.pad_token_id})")
