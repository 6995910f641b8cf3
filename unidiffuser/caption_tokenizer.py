"""The caption decoder's GPT-2 tokenizer, decoding only: token ids -> text, as the original's
`GPT2Tokenizer.decode(ids, skip_special_tokens=True)` with transformers 4.x's default space
clean-up (models/caption_decoder.py, clean_up_tokenization).

GPT-2's byte-level BPE needs no merges to decode: each id's token is a string of byte stand-ins
(the same byte -> symbol table as CLIP's), joined and mapped back to bytes, read as UTF-8 with
replacement (GPT2Tokenizer's errors="replace"). The special ids (<|endoftext|> = 50256 and the
caption decoder's added <|EOS|> = 50257) are skipped. The files come from the hub's gpt2 repo
(vocab.json, merges.txt); `write_random_files` makes stand-ins for random-weight folders.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Sequence

from models.caption_decoder import clean_up_tokenization

from .tokenizer import _byte_symbols

VOCAB_SIZE = 50257          # GPT-2's; the caption decoder adds <|EOS|> = 50257 after it
ENDOFTEXT = "<|endoftext|>"


class CaptionTokenizer:
    def __init__(self, folder: Path):
        path = Path(folder) / "vocab.json"
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON vocabulary ({e}); re-run convert_weights.py") from None
        if (not isinstance(vocab, dict) or len(vocab) != VOCAB_SIZE or vocab.get(ENDOFTEXT) != VOCAB_SIZE - 1
                or sorted(vocab.values()) != list(range(VOCAB_SIZE))):
            raise ValueError(f"{path}: expected GPT-2's vocabulary, {VOCAB_SIZE} token -> id entries with "
                             f"{ENDOFTEXT} = {VOCAB_SIZE - 1}; re-run convert_weights.py")
        self.tokens = [""] * VOCAB_SIZE
        for tok, i in vocab.items():
            self.tokens[i] = tok
        self.byte_of = {sym: b for b, sym in _byte_symbols().items()}

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.tokens[i] for i in ids if i < VOCAB_SIZE - 1)
        data = bytes(self.byte_of[c] for c in text if c in self.byte_of)
        return clean_up_tokenization(data.decode("utf-8", errors="replace"))


def write_random_files(out_dir: Path) -> None:
    """A vocabulary of GPT-2's size and layout (ids 0-255 the byte symbols, <|endoftext|> last)
    with made-up words between, and an empty merge list: enough to decode random captions."""
    from .files import atomic_write_text   # only random folders are written: decoding does not need it
    symbols = list(_byte_symbols().values())
    words = ("".join(p) for n in itertools.count(2) for p in itertools.product("etaoinshrdlucmfw", repeat=n))
    made_up = []
    for w in words:
        made_up += ["\u0120" + w, w]             # \u0120 (Ġ) stands for a leading space, as in GPT-2
        if len(made_up) >= VOCAB_SIZE - 1 - len(symbols):
            break
    vocab = symbols + made_up[:VOCAB_SIZE - 1 - len(symbols)] + [ENDOFTEXT]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n")
