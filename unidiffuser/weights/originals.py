"""Reading the original UniDiffuser-v1 files (SRC, laid out as folders.placement_help says) into
the state dicts of the networks, strictly: each network's parts (networks.py) must give exactly
its module's names and shapes. Checkpoints are loaded with `torch.load(weights_only=True)` (no
pickled code runs) or safetensors; --download fetches them with huggingface_hub.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from models.config import ModelConfig

from ..limits import JSONError, read_json
from ..networks import ALL, CLIP_DIR, CLIP_IMAGE_DIR, HUB_FILES, HUB_FOLDERS, HUB_REPO, NAMES, NETWORKS, ORIGINALS, Part, build
from .folders import RANDOM_MARK, CheckpointError, placement_help
from .loading import check_state_dict

log = logging.getLogger("unidiffuser")

MODEL_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")   # a transformers folder's, either format


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def load_safetensors(path: Path, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names start with one of prefixes (only those are
    read; every tensor without prefixes)."""
    from safetensors import SafetensorError, safe_open
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not prefixes or k.startswith(prefixes)}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def part_tensors(src: Path, part: Part) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors `part` takes from its file under src, and the file they were read from."""
    path = Path(src) / part.file
    if part.file.endswith("/"):    # a transformers folder: its weights in either format
        path = next((path / f for f in MODEL_FOLDER_WEIGHTS if (path / f).is_file()), None)
        if path is None:
            raise CheckpointError(f"{Path(src) / part.file}: no {' or '.join(MODEL_FOLDER_WEIGHTS)}")
    if path.suffix == ".safetensors":   # only the kept names are read (CLIP's other tower is not needed)
        sd = load_safetensors(path, prefixes=tuple(p for k in part.keep for p in {k, part.strip + k}))
    else:
        sd = load_torch_file(path)
    return part.select(sd), path


def read_network(src: Path, name: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One network's state dict from the original files, checked against its module."""
    net, sd, read = NETWORKS[name], {}, []
    for part in net.parts:
        tensors, path = part_tensors(src, part)
        sd.update(tensors)
        read.append(str(path))
    sd = {k: v for k, v in sd.items() if k not in net.derived}    # the module fills them itself
    check_state_dict(build(name, cfg, device="meta"), sd, " + ".join(read), net.mismatch_hint, net.derived)
    return sd


def read_originals(src: Path, cfg: ModelConfig) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """Every network whose original files are in src: (state dict, where it came from for the
    manifest). Text-to-image's must be there (missing_originals); the other tasks' networks are
    left out, with one line saying what to place or download, when their files are not."""
    out = {}
    for name in ALL:
        absent = part_missing(src, NETWORKS[name].parts) + [str(Path(src) / f) for f in NETWORKS[name].needs
                                                             if not (Path(src) / f).is_file()]
        if absent:
            log.warning("%s: not found, so the model folder gets no %s (the tasks that read images or write "
                        "texts need it); place it or use --download", absent[0], name)
            continue
        out[name] = (read_network(src, name, cfg), NETWORKS[name].source)
    return out


def part_missing(src: Path, parts) -> list[str]:
    """The files of `parts` that are not in src."""
    src, missing = Path(src), []
    for part in parts:
        path = src / part.file
        if part.file.endswith("/"):
            if not (path / "config.json").is_file():
                missing.append(str(path / "config.json"))
            if not any((path / f).is_file() for f in MODEL_FOLDER_WEIGHTS):
                missing.append(str(path / MODEL_FOLDER_WEIGHTS[0]))
        elif not path.is_file():
            missing.append(str(path))
    return missing


def missing_originals(src: Path) -> list[str]:
    """Text-to-image's original files that are not in src."""
    return list(dict.fromkeys(part_missing(src, dict.fromkeys(p for n in NAMES for p in NETWORKS[n].parts))))


def download_originals(src: Path) -> Path:
    """Fetch the original files into src with huggingface_hub; offline, say what to place where.
    On failure, what the attempt created (src itself, huggingface_hub's .cache/) is removed."""
    from huggingface_hub import hf_hub_download, snapshot_download
    src = Path(src)
    folders = [src / d for d, _, _ in HUB_FOLDERS]
    created = [p for p in (src, src / ".cache", *folders, *(d / ".cache" for d in folders),
                           *(src / f for f in ORIGINALS)) if not p.exists()]
    # huggingface_hub logs through its own handler and also propagates to ours: every retry
    # line would print twice.
    hub_log = logging.getLogger("huggingface_hub")
    propagate, hub_log.propagate = hub_log.propagate, False
    try:
        for f in HUB_FILES:
            hf_hub_download(HUB_REPO, f, local_dir=src)
        for folder, repo, files in HUB_FOLDERS:
            snapshot_download(repo, local_dir=src / folder, allow_patterns=list(files))
    except BaseException as e:   # stopped by a signal too: what it created goes
        for p in created:   # outermost first: removing src removes the rest
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        if not isinstance(e, Exception):
            raise
        raise CheckpointError(f"could not download the original weights ({type(e).__name__}: {e}).\n"
                              + placement_help(src) + "\nTo try the tool without weights: "
                              "python convert_weights.py --random tiny --out tiny") from None
    finally:
        hub_log.propagate = propagate
    (src / RANDOM_MARK).unlink(missing_ok=True)   # random files it held are replaced now
    return src


def clip_config_matches(src: Path, cfg: ModelConfig) -> None:
    """The CLIP towers' config.json agree with the preset (a CLIPModel config nests each tower's
    fields): a wrong download is one line, not a shape error deep in a network."""
    for folder, key, want in ((CLIP_DIR, "text_config", cfg.text_encoder.clip_fields()),
                              (CLIP_IMAGE_DIR, "vision_config", cfg.image_encoder.clip_fields())):
        path = Path(src) / folder / "config.json"
        if folder != CLIP_DIR and not path.is_file():
            continue   # an optional tower: read_originals says it is absent
        try:
            c = read_json(path, 1 << 20)
        except (OSError, JSONError) as e:
            raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None
        c = c.get(key, c) if isinstance(c, dict) else c    # a CLIPModel config nests each tower's fields
        if not isinstance(c, dict):
            raise CheckpointError(f"{path}: not a CLIP config (a JSON object of its fields)")
        diff = {k: (c.get(k), v) for k, v in want.items() if k in c and c[k] != v}
        if diff:
            raise CheckpointError(f"{path}: {key.split('_')[0]} config differs from the preset: "
                                  + ", ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in diff.items()))
