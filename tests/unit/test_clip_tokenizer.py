"""The torch-free CLIP tokenizer gives OpenCLIP's token ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import open_clip
import pytest

from imgembed.worker.onnx.clip_tokenizer import MERGES_FILE, ClipTokenizer

TEXTS = ["a photo of a dog", "Two   RED squares!!", "naïve café ünïcødé ✓ 日本語", "it's 3.14 o'clock &amp; more",
         "<start_of_text> hi <end_of_text>", "x" * 300, "", "emoji 🐶🐱 tabs\tand\nnewlines", "don't you'll I'd we've",
         "HTML &lt;b&gt; &amp;amp; twice", "mojibake: cafÃ©", "numbers 12345 and 1,000,000.5", "  padded  "]


@pytest.mark.parametrize("context_length", [77, 32, 16])
def test_same_ids_as_open_clip(context_length: int) -> None:
    merges = Path(importlib.util.find_spec("open_clip").origin).parent / MERGES_FILE  # type: ignore[arg-type, union-attr]
    ours = ClipTokenizer(merges, context_length)(TEXTS)
    theirs = open_clip.tokenize(TEXTS, context_length=context_length).numpy()
    assert ours.dtype == theirs.dtype
    assert ours.tolist() == theirs.tolist()
