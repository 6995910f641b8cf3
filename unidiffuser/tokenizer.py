"""CLIP BPE tokenization of openai/clip-vit-large-patch14: 77 ids, <|startoftext|> = 49406,
<|endoftext|> = 49407 (which also pads), longer prompts truncated with a warning.

The tokenizer files (vocab.json, merges.txt) come from the CLIP model folder when it has them.
Offline, they are rebuilt from the BPE merge list that OpenAI's `clip` package ships
(`clip/bpe_simple_vocab_16e6.txt.gz`, in the `openai-clip` distribution); that package is only
located, never imported, because its `__init__` needs torchvision.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from .files import atomic_write_text

log = logging.getLogger("unidiffuser")

MAX_LENGTH = 77
START, END = 49406, 49407
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# The BPE file has a header line, then merges; CLIP keeps the first 49152 - 256 - 2 of them so
# that 256 bytes x 2 (with and without </w>) + merges + 2 special tokens = 49408 ids.
NUM_MERGES = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in CLIP's id order: the
    bytes that are printable as themselves first, then the rest mapped to 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    n_other = 256 - len(printable)
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(n_other)]


def bundled_bpe_path() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if path.is_file():
                return path
    raise FileNotFoundError(
        "no CLIP tokenizer files: the model folder has no vocab.json/merges.txt and the "
        "'openai-clip' package (which ships clip/bpe_simple_vocab_16e6.txt.gz) is not installed; "
        "install it with: pip install --no-deps openai-clip==1.0.1")


def write_tokenizer_files(out_dir: Path, bpe_path: Path | None = None) -> None:
    """Write vocab.json and merges.txt for CLIP's BPE into out_dir."""
    bpe_path = bpe_path or bundled_bpe_path()
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)


class Tokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: tokenizer files missing: {', '.join(missing)}")
        try:
            self._tok = CLIPTokenizer.from_pretrained(str(folder))
        except Exception as e:   # tokenizers reports a bad vocab.json as a bare Exception
            raise ValueError(f"{folder}: vocab.json/merges.txt are not a readable CLIP BPE tokenizer "
                             f"({type(e).__name__}: {e}); re-run convert_weights.py") from None

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> int64 ids [len(prompts), 77]."""
        for p in prompts:
            n = len(self._tok(p)["input_ids"])
            if n > MAX_LENGTH:
                log.warning("prompt is %d tokens long; CLIP reads %d, the rest is cut: %r", n, MAX_LENGTH, p)
        enc = self._tok(prompts, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
        return enc["input_ids"]
