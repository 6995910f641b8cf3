"""Writing the converted model folder: complete under a temporary name, then swapped in."""
from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import ModelConfig

from .. import lifecycle, tokenizer
from ..files import atomic_write, atomic_write_text, current_umask, temp_dir_beside, write_failure
from ..networks import NETWORKS
from . import folders
from .folders import sha256
from .loading import DTYPES


def write_converted(out: Path, cfg: ModelConfig, networks: dict[str, tuple[dict[str, torch.Tensor], str]],
                    dtype: str, tokenizer_src: Path | None, random: bool, overwrite: bool = False,
                    src: Path | None = None, extra=None, caption_tokenizer_src: Path | None = None) -> Path:
    """Write the folder complete under a temporary name beside `out` (extra(tmp) adds to it),
    then swap it in: the old folder (one convert_weights.py wrote, folders.check_out) is renamed
    aside, the new one renamed in, then the old one deleted. Never half-written; a full disk is
    a clear error and leaves the old folder as it was. caption_tokenizer_src: the GPT-2
    tokenizer files of the caption decoder (when it is among the networks)."""
    out = Path(out)
    folders.check_out(out, overwrite, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)     # marked: a killed run's is swept by the next (lifecycle.py)
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        files = {}
        for name, (sd, source) in networks.items():
            path = tmp / NETWORKS[name].file
            tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items() if k not in NETWORKS[name].derived}
            atomic_write(path, partial(save_file, tensors, metadata={"source": source, "dtype": dtype}))
            files[path.name] = {"sha256": sha256(path), "bytes": path.stat().st_size, "dtype": dtype, "source": source}
        if not copy_files(tokenizer_src, tmp / "tokenizer", tokenizer.TOKENIZER_FILES):
            tokenizer.write_tokenizer_files(tmp / "tokenizer")
        small = list(folders.SMALL_FILES)
        if "caption_decoder" in networks:
            copy_files(caption_tokenizer_src, tmp / folders.CAPTION_TOKENIZER, tokenizer.TOKENIZER_FILES, required=True)
            small += [f"{folders.CAPTION_TOKENIZER}/{f}" for f in tokenizer.TOKENIZER_FILES]
        atomic_write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
        for name in small:
            files[name] = {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {"format": folders.MARKER, "version": folders.VERSION, "random_weights": random,
                    "dtype": dtype, "files": files}
        atomic_write_text(tmp / folders.MANIFEST, json.dumps(manifest, indent=2))
        if extra is not None:
            extra(tmp)
        swap_in(tmp, out, overwrite, src)
    finally:
        lifecycle.remove(tmp)     # swapped in: nothing left to remove
    return out


def copy_files(src: Path | None, dst: Path, names, required: bool = False) -> bool:
    """Copy src/NAME for each name into dst; False (nothing copied) when src lacks one of them."""
    if src is None or not all((Path(src) / f).is_file() for f in names):
        if required:
            raise folders.CheckpointError(f"{src}: needs {', '.join(names)}")
        return False
    dst.mkdir()
    for f in names:
        try:
            shutil.copyfile(Path(src) / f, dst / f)
        except OSError as e:
            raise write_failure(dst / f, e) from e
    return True


def swap_in(tmp: Path, out: Path, overwrite: bool, src: Path | None) -> None:
    folders.check_out(out, overwrite, src)   # again: the folder may have changed while converting
    # A signal waits until both renames are done; after SIGKILL between them, the next run's sweep
    # puts the old folder (".OUT.unidiffuser-old-...") back in its place.
    with lifecycle.deferred():
        if not out.exists() or not any(out.iterdir()):
            os.replace(tmp, out)                 # a missing or empty folder: one rename
            lifecycle.disown(tmp)
            return
        old = out.parent / lifecycle.marked(out.name, kind="old")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        lifecycle.disown(tmp)
        lifecycle.own(old, folder=True)
    shutil.rmtree(old)
    lifecycle.disown(old)


