"""Reading the original UniDiffuser-v1 files, writing and reading the converted model folder.

Original files (thu-ml/unidiffuser-v1 on the hub, and openai/clip-vit-large-patch14):

    SRC/uvit_v1.pth            UViT state dict
    SRC/caption_decoder.pth    GPT-2 caption decoder; only `module.encode_prefix.*` is read
    SRC/autoencoder_kl.pth     KL-f8 autoencoder; only `decoder.*` and `post_quant_conv.*` are read
    SRC/clip-vit-large-patch14/{config.json, model.safetensors | pytorch_model.bin, vocab.json, merges.txt}

Converted folder (what run.py reads):

    config.json                ModelConfig (models/config.py) as data
    manifest.json              per file (every one below): sha256 and size, for the networks also
                               dtype and source; whether the weights are random (folders.py)
    text_encoder.safetensors   text_model.* + encode_prefix.*
    uvit.safetensors           the UViT with its original names
    vae_decoder.safetensors    decoder.* + post_quant_conv.*
    tokenizer/{vocab.json, merges.txt}

Checkpoints are loaded with `torch.load(weights_only=True)` (no pickled code runs) or safetensors.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import mmap
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import PRESETS, ModelConfig
from models.text_encoder import TextEncoder, clip_text_config
from models.uvit import UViT
from models.vae_decoder import VAEDecoder

from . import folders, prefetch, tokenizer
from .files import current_umask, atomic_write, atomic_write_text, write_failure
from .folders import (AUTOENCODER_FILE, CAPTION_FILE, CLIP_DIR, CLIP_REPO, HUB_REPO, NETWORKS, UVIT_FILE,
                      placement_help, sha256)

log = logging.getLogger("unidiffuser")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint or model folder that is missing, unreadable or of the wrong layout."""


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Module constructors' random initialisation, skipped: on the meta device there is no data to
    fill, and running the init ops' meta kernels makes torch import its compiler stack (~1 s)."""
    OPS = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
           "xavier_normal_", "zeros_", "ones_", "constant_", "zero_", "fill_", "orthogonal_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.OPS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def build(name: str, cfg: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
    """The network with torch's default initialisation; on device "meta" it has shapes only
    (built in milliseconds, to be filled with load_state_dict(assign=True))."""
    make = {"text_encoder": lambda: TextEncoder(cfg.text_encoder), "uvit": lambda: UViT(cfg.uvit),
            "vae_decoder": lambda: VAEDecoder(cfg.vae_decoder)}[name]
    if device is None:
        return make()
    with torch.device(device), (_SkipInit() if torch.device(device).type == "meta" else nullcontext()):
        return make()


# ---------------------------------------------------------------------------------------------
# Reading originals

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


def load_safetensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names start with prefix (only those are read)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        if not prefix:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Strict: same names and shapes as the model, or a CheckpointError that lists the differences."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
                   for k in set(sd) & set(expected) if sd[k].shape != expected[k])

    def few(xs):
        return ", ".join(xs[:6]) + (f" and {len(xs) - 6} more" if len(xs) > 6 else "")

    problems = [f"missing keys: {few(missing)}" if missing else "",
                f"unexpected keys: {few(unexpected)}" if unexpected else "",
                f"wrong shapes: {few(wrong)}" if wrong else ""]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{source}: does not match the {type(model).__name__} layout; "
                              + "; ".join(problems) + (f". {hint}" if hint else ""))


def read_uvit(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = load_torch_file(path)
    hint = ("This looks like a UniDiffuser-v0 UViT (no data-type token); v1 (uvit_v1.pth) is expected."
            if "token_embedding.weight" not in sd and "pos_embed" in sd else "")
    check_state_dict(build("uvit", cfg, device="meta"), sd, str(path), hint)
    return sd


def read_vae_decoder(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = load_torch_file(path)
    # The encoder half is expected in the file and not needed; anything else must match.
    sd = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))}
    check_state_dict(build("vae_decoder", cfg, device="meta"), sd, str(path))
    return sd


def read_text_encoder(clip_dir: Path, caption_path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    clip_dir = Path(clip_dir)
    weights = next((clip_dir / f for f in ("model.safetensors", "pytorch_model.bin") if (clip_dir / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{clip_dir}: no model.safetensors or pytorch_model.bin (the {CLIP_REPO} weights)")
    # The vision tower in the same file is not needed: read only text_model.*
    if weights.suffix == ".safetensors":
        sd = load_safetensors(weights, prefix="text_model.")
    else:
        sd = {k: v for k, v in load_torch_file(weights).items() if k.startswith("text_model.")}
    # Older CLIP checkpoints also saved the position_ids buffer; positions are implicit here.
    sd.pop("text_model.embeddings.position_ids", None)
    # Only encode_prefix of the caption decoder; DataParallel saved it as module.encode_prefix.*
    cap = load_torch_file(caption_path)
    for name in ("weight", "bias"):
        key = next((k for k in (f"module.encode_prefix.{name}", f"encode_prefix.{name}") if k in cap), None)
        if key is None:
            raise CheckpointError(f"{caption_path}: no encode_prefix.{name} (expected the caption decoder "
                                  f"of {HUB_REPO}, with keys module.encode_prefix.*)")
        sd[f"encode_prefix.{name}"] = cap[key]
    check_state_dict(build("text_encoder", cfg, device="meta"), sd, f"{weights} + {caption_path}")
    return sd


def read_originals(src: Path, cfg: ModelConfig) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    src = Path(src)
    return {
        "text_encoder": (read_text_encoder(src / CLIP_DIR, src / CAPTION_FILE, cfg),
                         f"{CLIP_DIR}/ text_model.* + {CAPTION_FILE} encode_prefix.*"),
        "uvit": (read_uvit(src / UVIT_FILE, cfg), UVIT_FILE),
        "vae_decoder": (read_vae_decoder(src / AUTOENCODER_FILE, cfg),
                        f"{AUTOENCODER_FILE} decoder.* + post_quant_conv.*"),
    }


def missing_originals(src: Path) -> list[str]:
    src = Path(src)
    need = [src / UVIT_FILE, src / CAPTION_FILE, src / AUTOENCODER_FILE, src / CLIP_DIR / "config.json"]
    missing = [str(p) for p in need if not p.is_file()]
    if not any((src / CLIP_DIR / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        missing.append(str(src / CLIP_DIR / "model.safetensors"))
    return missing


def download_originals(src: Path) -> Path:
    """Fetch the original files into src with huggingface_hub; offline, say what to place where.
    On failure, what the attempt created (src itself, huggingface_hub's .cache/) is removed."""
    from huggingface_hub import hf_hub_download, snapshot_download
    src = Path(src)
    clip = src / CLIP_DIR
    created = [p for p in (src, src / ".cache", clip, clip / ".cache", *(src / f for f in folders.ORIGINALS))
               if not p.exists()]
    # huggingface_hub logs through its own handler and also propagates to ours: every retry
    # line would print twice.
    hub_log = logging.getLogger("huggingface_hub")
    propagate, hub_log.propagate = hub_log.propagate, False
    try:
        for f in (UVIT_FILE, CAPTION_FILE, AUTOENCODER_FILE):
            hf_hub_download(HUB_REPO, f, local_dir=src)
        snapshot_download(CLIP_REPO, local_dir=clip,
                          allow_patterns=list(folders.CLIP_FILES))
    except Exception as e:
        for p in created:   # outermost first: removing src removes the rest
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        raise CheckpointError(f"could not download the original weights ({type(e).__name__}: {e}).\n"
                              + placement_help(src) + "\nTo try the tool without weights: "
                              "python convert_weights.py --random tiny --out tiny") from None
    finally:
        hub_log.propagate = propagate
    (src / folders.RANDOM_MARK).unlink(missing_ok=True)   # random files it held are replaced now
    return src


def clip_config_matches(clip_dir: Path, cfg: ModelConfig) -> None:
    path = Path(clip_dir) / "config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None
    c = c.get("text_config", c)   # a CLIPModel config nests the text tower's fields
    want = cfg.text_encoder.clip_fields()
    diff = {k: (c.get(k), v) for k, v in want.items() if k in c and c[k] != v}
    if diff:
        raise CheckpointError(f"{path}: text config differs from the preset: "
                              + ", ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in diff.items()))


# ---------------------------------------------------------------------------------------------
# Random weights in the original layouts (tests and benchmarks without downloads)

def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Deterministic random weights with healthy activations: matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1), biases and norm shifts ~ N(0, 0.1), position tables ~ N(0, 0.02).
    Drawn on the generator's device (a CUDA generator fills v1 in well under a second)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=generator.device)
            if p.ndim == 1:
                is_scale = name.endswith("weight")
                p.copy_(1 + 0.1 * noise if is_scale else 0.1 * noise)
            elif p.shape[0] == 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))
    return module


def _encoder_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the autoencoder's encoder half (present in autoencoder_kl.pth)."""
    v = cfg.vae_decoder
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    conv("encoder.conv_in", v.out_ch, v.ch, 3)
    cin = v.ch
    for i, m in enumerate(v.ch_mult):
        for j in range(v.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, v.ch * m)
            cin = v.ch * m
        if i != len(v.ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    resnet("encoder.mid.block_1", cin, cin)
    norm("encoder.mid.attn_1.norm", cin)
    for n in ("q", "k", "v", "proj_out"):
        conv(f"encoder.mid.attn_1.{n}", cin, cin, 1)
    resnet("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, 2 * v.z_channels, 3)
    conv("quant_conv", 2 * v.z_channels, 2 * v.embed_dim, 1)
    return shapes


def write_random_originals(src: Path, preset: str, seed: int = 0) -> ModelConfig:
    """Random weights written exactly where and how the original files are laid out."""
    from transformers import CLIPConfig

    cfg = PRESETS[preset]
    src = Path(src)
    (src / CLIP_DIR).mkdir(parents=True, exist_ok=True)
    # The mark goes first: if writing stops half-way, the folder is still known as ours.
    (src / folders.RANDOM_MARK).write_text(f"random weights, preset {preset}, seed {seed}\n")
    g = torch.Generator().manual_seed(seed)

    atomic_write(src / UVIT_FILE, partial(torch.save, randomize_(build("uvit", cfg), g).state_dict()))

    vae = randomize_(build("vae_decoder", cfg), g).state_dict()
    for k, shape in _encoder_shapes(cfg).items():
        vae[k] = torch.randn(shape, generator=g) * 0.05
    atomic_write(src / AUTOENCODER_FILE, partial(torch.save, vae))

    te = randomize_(build("text_encoder", cfg), g).state_dict()
    # The real caption decoder also holds a GPT-2 (module.gpt.*), not needed for text-to-image.
    d = cfg.text_encoder
    cap = {"module.encode_prefix.weight": te.pop("encode_prefix.weight"),
           "module.encode_prefix.bias": te.pop("encode_prefix.bias"),
           "module.decode_prefix.weight": torch.randn(d.hidden_size, d.prefix_dim, generator=g) * 0.1,
           "module.decode_prefix.bias": torch.zeros(d.hidden_size)}
    atomic_write(src / CAPTION_FILE, partial(torch.save, cap))
    atomic_write(src / CLIP_DIR / "model.safetensors", partial(save_file, {k: v.contiguous() for k, v in te.items()}))
    clip_cfg = CLIPConfig(text_config=clip_text_config(d).to_dict()).to_dict()
    atomic_write_text(src / CLIP_DIR / "config.json", json.dumps(clip_cfg, indent=2, default=str))
    tokenizer.write_tokenizer_files(src / CLIP_DIR)
    return cfg


# ---------------------------------------------------------------------------------------------
# The converted folder

def write_converted(out: Path, cfg: ModelConfig, networks: dict[str, tuple[dict[str, torch.Tensor], str]],
                    dtype: str, tokenizer_src: Path | None, random: bool, overwrite: bool = False,
                    src: Path | None = None, extra=None) -> Path:
    """Write the folder complete under a temporary name beside `out` (extra(tmp) adds to it),
    then swap it in: the old folder (one convert_weights.py wrote, folders.check_out) is renamed
    aside, the new one renamed in, then the old one deleted. Never half-written; a full disk is
    a clear error and leaves the old folder as it was."""
    out = Path(out)
    folders.check_out(out, overwrite, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        files = {}
        for name, (sd, source) in networks.items():
            path = tmp / f"{name}.safetensors"
            tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}
            atomic_write(path, partial(save_file, tensors, metadata={"source": source, "dtype": dtype}))
            files[path.name] = {"sha256": sha256(path), "bytes": path.stat().st_size, "dtype": dtype, "source": source}
        tok_dir = tmp / "tokenizer"
        if tokenizer_src is not None and all((Path(tokenizer_src) / f).is_file() for f in tokenizer.TOKENIZER_FILES):
            tok_dir.mkdir()
            for f in tokenizer.TOKENIZER_FILES:
                try:
                    shutil.copyfile(Path(tokenizer_src) / f, tok_dir / f)
                except OSError as e:
                    raise write_failure(tok_dir / f, e) from e
        else:
            tokenizer.write_tokenizer_files(tok_dir)
        atomic_write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
        for name in folders.SMALL_FILES:
            files[name] = {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {"format": folders.MARKER, "version": folders.VERSION, "random_weights": random,
                    "dtype": dtype, "files": files}
        atomic_write_text(tmp / folders.MANIFEST, json.dumps(manifest, indent=2))
        if extra is not None:
            extra(tmp)
        swap_in(tmp, out, overwrite, src)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def swap_in(tmp: Path, out: Path, overwrite: bool, src: Path | None) -> None:
    folders.check_out(out, overwrite, src)   # again: the folder may have changed while converting
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)                 # a missing or empty folder: one rename
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def check_config_types(cfg: ModelConfig, path: Path) -> None:
    """Each field has its default's type (a hand-edited "1536" fails here, not deep in torch)."""
    for net in ("uvit", "text_encoder", "vae_decoder"):
        sub = getattr(cfg, net)
        for f in dataclasses.fields(sub):
            v, d = getattr(sub, f.name), f.default
            if isinstance(d, bool) or isinstance(d, str):
                ok = type(v) is type(d)
            elif isinstance(d, int):
                ok = type(v) is int and v > 0
            elif isinstance(d, float):
                ok = type(v) in (int, float) and v > 0
            else:   # tuple of positive ints
                ok = isinstance(v, tuple) and len(v) > 0 and all(type(x) is int and x > 0 for x in v)
            if not ok:
                want = {bool: "true/false", str: "a string", int: "a positive integer",
                        float: "a positive number"}.get(type(d), "a list of positive integers")
                raise CheckpointError(f"{path}: {net}.{f.name} must be {want}, got {v!r}; "
                                      "re-run convert_weights.py")


def read_manifest(model_dir: Path) -> tuple[ModelConfig, dict]:
    """config.json and manifest.json, checked for structure and types; no weights are read."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found (make one with convert_weights.py)")
    try:
        manifest = folders.read_manifest_json(model_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    path = model_dir / "config.json"
    try:
        cfg = ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: missing or unreadable ({e}); re-run convert_weights.py") from None
    check_config_types(cfg, path)
    return cfg, manifest


def verify_small_files(model_dir: Path, manifest: dict) -> None:
    """config.json and tokenizer/ against the manifest's sha256 (the networks are checked as
    they load): a swapped id in vocab.json changes every image."""
    try:
        folders.verify_files(model_dir, manifest, folders.SMALL_FILES)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_network(model_dir: Path, name: str, cfg: ModelConfig, manifest: dict, verify: bool = True
                 ) -> dict[str, torch.Tensor]:
    """One network's state dict from the converted folder, on the CPU as stored, checked against
    the manifest (sha256 of the bytes read unless verify=False, names, shapes)."""
    return _load_checked(Path(model_dir), name, manifest, verify, torch.device("cpu"), None)(build(name, cfg, "meta"))


def load_networks(model_dir: Path, cfg: ModelConfig, manifest: dict, device: str | torch.device,
                  dtype: torch.dtype) -> dict[str, nn.Module]:
    """The three networks, built without initialisation (on the meta device) and filled with the
    folder's tensors in dtype on device. Each file is read once; its sha256 is computed from those
    bytes in a thread (hashlib releases the GIL) while the tensors are cast and moved."""
    model_dir, device = Path(model_dir), torch.device(device)
    t0 = time.perf_counter()
    nets = {}
    # On the CPU the hash threads and torch's cast threads share few cores: casting on one thread
    # keeps torch's workers from spinning at barriers while a hash holds their core.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        # Largest file first: its hash takes longest and starts earliest.
        order = sorted(NETWORKS, key=lambda n: -manifest["files"].get(f"{n}.safetensors", {}).get("bytes", 0))
        pending = [(name, _load_checked(model_dir, name, manifest, True, device, dtype)) for name in order]
        for name, finish in pending:
            nets[name] = build(name, cfg, device="meta")
            nets[name].load_state_dict(finish(nets[name]), assign=True)
    finally:
        torch.set_num_threads(threads)
    for name, net in nets.items():
        left = [k for k, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:   # a buffer outside the state dict that the module did not compute itself
            raise CheckpointError(f"{name}: not filled from {name}.safetensors: {', '.join(left[:6])}")
    size = sum(manifest["files"][f"{n}.safetensors"].get("bytes", 0) for n in NETWORKS) / 1e9
    log.info("loaded %s (%.2f GB, sha256 checked) in %.2f s", ", ".join(NETWORKS), size, time.perf_counter() - t0)
    return {name: nets[name] for name in NETWORKS}


def _load_checked(model_dir: Path, name: str, manifest: dict, verify: bool, device: torch.device,
                  dtype: torch.dtype | None) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """Map the file once (or take the mapping run.py started, see prefetch.py) and hash it in a
    thread; the tensors are cast and moved meanwhile. The returned function waits for the hash
    and returns the state dict, checked against the (meta) network it is for."""
    path = model_dir / f"{name}.safetensors"
    entry = manifest["files"].get(path.name)
    if entry is None:
        raise CheckpointError(f"{model_dir}/manifest.json: no entry for {path.name}")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (listed in the manifest; re-run convert_weights.py)")
    started = prefetch.take(path)
    data, digest = started if started is not None else (map_file(path), None)
    if verify and digest is None:
        digest = prefetch.sha256_in_thread(data)
    if not verify:
        digest = None
    try:
        sd = _cast_all(tensors_from_bytes(data, str(path)), device, dtype)
    except CheckpointError:
        if digest is not None and digest.result() != entry["sha256"]:
            raise _sha_mismatch(path) from None
        raise

    def finish(net: nn.Module) -> dict[str, torch.Tensor]:
        if digest is not None and digest.result() != entry["sha256"]:
            raise _sha_mismatch(path)
        check_state_dict(net, sd, str(path))
        return sd

    return finish


def _sha_mismatch(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: sha256 does not match manifest.json (file changed or corrupt; "
                           f"re-run convert_weights.py)")


def _cast_all(sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors in dtype on device. Tensors already in dtype on the CPU stay views of the
    mapped file; on an accelerator the cast runs there (the host may have few cores)."""
    def target(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    if device.type == "cpu":
        return {k: t.to(target(t)) for k, t in sd.items()}
    return {k: t.to(device).to(target(t)) for k, t in sd.items()}


def map_file(path: Path) -> mmap.mmap:
    try:
        mem = prefetch.map_file(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    prefetch.populate(mem)
    return mem


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def tensors_from_bytes(data: bytearray, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in memory, as views of it (no copy): safetensors' own
    loaders open the file themselves, and here the hash and the tensors share one read. The format is
    an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
    the raw data; everything the header claims is checked against the buffer before a view is made."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a readable safetensors file ({why})")

    if len(data) < 8:
        raise bad("shorter than its header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise bad("header length beyond the end of the file")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    start, size = 8 + n, len(data) - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"entry {name!r} has a bad or unsupported dtype/shape/data_offsets ({e!r})") from None
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size or end - begin != numel * dtype.itemsize:
            raise bad(f"entry {name!r}: shape {shape} {info['dtype']} does not fit data_offsets {[begin, end]}")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin).view(shape)
    return out
