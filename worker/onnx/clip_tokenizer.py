"""CLIP's byte-pair tokenizer without PyTorch, for workers that run the text tower with ONNX Runtime.

It gives the same token ids as OpenCLIP's default tokenizer (its ``SimpleTokenizer`` with the
``lower`` cleaning): the text is repaired (ftfy), unescaped, its whitespace collapsed and lowered;
split into words, numbers and punctuation; each piece's UTF-8 bytes written as printable
characters and merged pair by pair, lowest rank first, by the merge list OpenCLIP ships
(``bpe_simple_vocab_16e6.txt.gz``, copied beside each exported model). Models whose OpenCLIP
tokenizer is another one (Hugging Face tokenizers, other cleaning) are not exported for ONNX.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import numpy as np

START = "<start_of_text>"
END = "<end_of_text>"
MERGE_COUNT = 49152 - 256 - 2  # the merges CLIP's vocabulary of 49,408 ids uses
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenCLIP's merge list


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Each byte as one printable character: printable Latin-1 bytes stand for themselves, the
    others (controls, space, a few more) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in alphabet:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return alphabet


def clean(text: str) -> str:
    """OpenCLIP's ``lower`` cleaning: repaired mojibake, HTML entities undone (twice), whitespace
    collapsed, lower case."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # pragma: no cover - ftfy comes with the worker extra
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Texts -> (N, context_length) int64 token ids, as OpenCLIP's tokenizer gives them."""

    def __init__(self, merges_file: Path, context_length: int) -> None:
        import regex

        with gzip.open(merges_file, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")[1:MERGE_COUNT + 1]
        merges = [tuple(line.split()) for line in lines]
        symbols = list(byte_alphabet().values())
        vocabulary = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges),
                      START, END]
        self.ids = {token: index for index, token in enumerate(vocabulary)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.context_length = context_length
        self.start_id, self.end_id = self.ids[START], self.ids[END]
        self.pattern = regex.compile(
            rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)
        self._pieces: dict[str, list[str]] = {START: [START], END: [END]}

    def _merge(self, word: str) -> list[str]:
        """A word's symbols merged pair by pair, the lowest-ranked pair present first."""
        known = self._pieces.get(word)
        if known is not None:
            return known
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            index = 0
            while index < len(symbols):
                if index < len(symbols) - 1 and (symbols[index], symbols[index + 1]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        if len(self._pieces) < 100_000:
            self._pieces[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        alphabet = byte_alphabet()
        ids: list[int] = []
        for piece in self.pattern.findall(clean(text)):
            word = "".join(alphabet[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.ids[symbol] for symbol in self._merge(word))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        tokens = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id][: self.context_length]
            ids[-1] = self.end_id
            tokens[row, : len(ids)] = ids
        return tokens
