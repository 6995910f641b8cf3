"""What a request may ask for, checked without torch, and the error that names a bad input.

The commands check their arguments with these before importing anything heavy, and the library
checks every request (the Python API's too) with the same rules and messages. A message names
parameters, not flags: `InputError` keeps the names apart from the text, so the commands can
spell each one as their flag (cli.run) and the API as its keyword.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import string
from typing import Callable

# The largest image side accepted: 8x the side v1 was trained at (512). Beyond it the UViT's
# interpolated positional embedding has nothing left to say, and the decoder alone needs tens of GiB.
MAX_SIDE = 4096
MAX_STEPS = 1000   # the discrete noise schedule has 1000 steps; the solver needs no more
MAX_BATCH = 4096   # images in one batch: far beyond what any GPU holds at 512x512 (memory.py says what fits)
MAX_SEED = 2**64   # torch.Generator.manual_seed takes [0, 2**64)


class CheckpointError(ValueError):
    """A checkpoint or model folder that is missing, unreadable or of the wrong layout."""


def few(xs: list[str], n: int = 5) -> str:
    return ", ".join(xs[:n]) + (f" and {len(xs) - n} more" if len(xs) > n else "")


class InputError(ValueError):
    """A bad input. `template` is str.format text in which {name} fields are parameter names
    and {0}, {1}, ... the given values (inserted as given, never parsed as a template)."""

    def __init__(self, param: str, template: str, *values):
        self.param, self.template, self.values = param, template, values
        super().__init__(self.render())

    def render(self, spell: Callable[[str], str] = str) -> str:
        names = {f for _, f, _, _ in string.Formatter().parse(self.template) if f and not f[0].isdigit()}
        return self.template.format(*self.values, **{n: spell(n) for n in names})


class InputTypeError(InputError, TypeError):
    """A value of the wrong type (also a ValueError, so that one except clause takes every bad input)."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(name: str, value, lo: int, hi: int) -> None:
    if not is_int(value):
        raise InputTypeError(name, "{%s} must be an integer in %d..%d, got {0!r}" % (name, lo, hi), value)
    if not lo <= value <= hi:
        raise InputError(name, "{%s} must be in %d..%d, got {0}" % (name, lo, hi), value)


def check_side(name: str, value) -> None:
    if not is_int(value) or value <= 0 or value % 16 or value > MAX_SIDE:
        cls = InputError if is_int(value) else InputTypeError
        raise cls(name, "{%s} must be a positive multiple of 16 (8x VAE, 2x2 patches) of at most %d, got {0!r}"
                  % (name, MAX_SIDE), value)


def check_steps(steps, name: str = "steps") -> None:
    check_int(name, steps, 1, MAX_STEPS)


def check_scale(scale, name: str = "scale") -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise InputTypeError(name, "{%s} must be a finite number, got {0!r}" % name, scale)
    if not math.isfinite(scale):
        raise InputError(name, "{%s} must be a finite number, got {0}" % name, scale)


def check_seeds(seeds, name: str = "seed") -> None:
    """Every image's seed: an integer in [0, 2**64)."""
    for s in seeds:
        if not is_int(s):
            raise InputTypeError(name, "{%s}: every image's seed must be an integer in [0, 2**64), got {0!r}"
                                 % name, s)
        if not 0 <= s < MAX_SEED:
            raise InputError(name, "{%s}: every image's seed must be an integer in [0, 2**64), got {0}" % name, s)


# -- JSON from files we did not necessarily write ---------------------------------------------------

MAX_JSON_DEPTH = 32     # the deepest JSON this project writes or reads is 3 levels (a safetensors header)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONError(ValueError):
    """A JSON document that is too large, too deeply nested, or not JSON; the text says which."""


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of `text` nest (strings skipped), without parsing it:
    json.loads recurses once per level, and a document of ten thousand '[' would end in a
    RecursionError instead of an answer."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    if len(brackets) < 1 << 16:
        return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets))
    import numpy as np
    b = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    return int(np.cumsum(np.where((b == ord("[")) | (b == ord("{")), 1, -1)).max())


def parse_json(data: bytes | str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, what: str = "JSON"):
    """json.loads with limits: at most max_bytes, nested at most max_depth levels, strict UTF-8.
    Raises JSONError with the reason (the caller names the file)."""
    if len(data) > max_bytes:
        raise JSONError(f"{what} of {len(data)} bytes, larger than the {max_bytes} it may have")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"{what} is not UTF-8 text ({e})") from None
    depth = json_depth(data)
    if depth > max_depth:
        raise JSONError(f"{what} nested {depth} levels deep, more than the {max_depth} it may have")
    try:
        return json.loads(data)
    except RecursionError:   # not reached after the depth check; kept as the last guard
        raise JSONError(f"{what} nested too deeply") from None
    except ValueError as e:   # JSONDecodeError, an integer of too many digits
        raise JSONError(f"{what} is not valid JSON ({e})") from None


def read_json(path, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, what: str = "JSON"):
    """parse_json of a file, read only up to max_bytes (+1, to tell a larger file). OSError when
    it cannot be read; JSONError when its content is not acceptable."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return parse_json(data, max_bytes, max_depth, what)
