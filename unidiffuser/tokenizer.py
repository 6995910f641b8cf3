"""CLIP BPE tokenization of openai/clip-vit-large-patch14: 77 ids, <|startoftext|> = 49406,
<|endoftext|> = 49407 (which also pads), longer prompts truncated with a warning.

The ids are those of the original UniDiffuser (transformers 4.23.1's slow CLIPTokenizer with ftfy
6.1.1 installed), done here rather than by transformers: transformers 5's CLIPTokenizer skips the
cleaning, and 4.x's cleans differently when ftfy is missing, so the ids would depend on what
happens to be installed. Per prompt, as the original: split at literal <|startoftext|> /
<|endoftext|> (kept as those ids), then each piece is cleaned (ftfy.fix_text, whitespace runs
collapsed and stripped, str.lower()), cut into words by CLIP's pattern, and byte-level BPE'd.
tests/data/tokenizer_oracle.json holds the original stack's ids for the prompts the tests check.

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
from itertools import pairwise
from pathlib import Path

import ftfy
import regex
import torch

from .limits import JSONError, read_json

log = logging.getLogger("unidiffuser")

MAX_LENGTH = 77
START, END = 49406, 49407
SPECIALS = {"<|startoftext|>": START, "<|endoftext|>": END}
VOCAB_SIZE = 49408
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# The BPE file has a header line, then merges; CLIP keeps the first 49152 - 256 - 2 of them so
# that 256 bytes x 2 (with and without </w>) + merges + 2 special tokens = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
MAX_FILE_BYTES = 16 << 20     # CLIP's vocab.json is 1.6 MB, merges.txt 0.5 MB

# The original's added-token split: exact, case-sensitive matches of the special tokens.
_SPECIAL_SPLIT = regex.compile("(" + "|".join(regex.escape(s) for s in SPECIALS) + ")")
# CLIP's word pattern (the `regex` module for \p{L} / \p{N}); the special tokens are still in it, so a
# cleaned piece that becomes one (e.g. "&lt;|endoftext|&gt;" or "<|ENDOFTEXT|>") maps to its id.
_WORDS = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                       regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")


def _byte_symbols() -> dict[int, str]:
    """byte -> the printable stand-in byte-level BPE uses for it, in CLIP's id order: the bytes
    that are printable as themselves first, then the rest mapped to 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


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
    from .files import atomic_write_text   # only conversion writes: the runtime tokenizer does not need it
    bpe_path = bpe_path or bundled_bpe_path()
    with gzip.open(bpe_path) as f:
        merges = f.read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    symbols = list(_byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)


def clean(text: str) -> str:
    """The original's cleaning of one piece of a prompt (a piece has no special-token text)."""
    return _SPACES.sub(" ", ftfy.fix_text(text)).strip().lower()


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = read_json(path, MAX_FILE_BYTES)
    except (OSError, JSONError) as e:
        raise ValueError(f"{path}: not a readable JSON vocabulary ({e})") from None
    if (not isinstance(vocab, dict) or len(vocab) != VOCAB_SIZE
            or not all(isinstance(k, str) and type(v) is int and 0 <= v < VOCAB_SIZE for k, v in vocab.items())):
        raise ValueError(f"{path}: expected CLIP's vocabulary, a JSON object of {VOCAB_SIZE} token -> id entries, "
                         f"ids in 0..{VOCAB_SIZE - 1}")
    if {s: vocab.get(s) for s in SPECIALS} != SPECIALS:
        raise ValueError(f"{path}: expected <|startoftext|> = {START} and <|endoftext|> = {END}")
    return vocab


def _read_merges(path: Path) -> dict[tuple[str, str], int]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than the {MAX_FILE_BYTES} it may have")
        lines = path.read_text(encoding="utf-8").strip().split("\n")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable merge list ({e})") from None
    # like the original: skip the header line, keep the first NUM_MERGES
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected a header line and {NUM_MERGES} merges of two symbols each")
    # a repeated pair keeps its last rank, as a dict built from the list does in the original
    return {pair: rank for rank, pair in enumerate(merges)}


class Tokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: tokenizer files missing: {', '.join(missing)}")
        self.vocab = _read_vocab(folder / "vocab.json")
        self.ranks = _read_merges(folder / "merges.txt")
        self._byte_symbol = _byte_symbols()
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        """Ids of one word (CLIP's byte stand-ins, the last one marked end-of-word): merge the
        lowest-ranked adjacent pair everywhere, left to right, until no pair is in the merge list."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, NUM_MERGES), p) for p in pairwise(parts))
            if rank == NUM_MERGES:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        # the original maps a symbol outside the vocabulary to its unknown token, <|endoftext|>
        ids = [self.vocab.get(p, END) for p in parts]
        if len(self._cache) < 100_000:    # bounded: a server sees arbitrary prompts
            self._cache[word] = ids
        return ids

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids, without <|startoftext|>/<|endoftext|> around them and untruncated."""
        ids = []
        for piece in _SPECIAL_SPLIT.split(prompt):
            if piece in SPECIALS:
                ids.append(SPECIALS[piece])
                continue
            for word in _WORDS.findall(clean(piece)):
                if word in SPECIALS:
                    ids.append(SPECIALS[word])
                else:
                    ids += self._bpe("".join(self._byte_symbol[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> int64 ids [len(prompts), 77]."""
        rows = []
        for p in prompts:
            body = self.encode(p)
            if len(body) + 2 > MAX_LENGTH:
                log.warning("prompt is %d tokens long; CLIP reads %d, the rest is cut: %r", len(body) + 2, MAX_LENGTH, p)
            ids = [START, *body[:MAX_LENGTH - 2], END]
            rows.append(ids + [END] * (MAX_LENGTH - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), MAX_LENGTH)
