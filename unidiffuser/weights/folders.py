"""The model folder and the folders the commands may write into or replace, decided before any
work starts. No torch here: these checks run in the first second of a command.

A converted model folder is recognised by its manifest.json: {"format": MARKER, "version": 2,
"files": {relative path: {"sha256", "bytes", ...}}} lists every file the folder needs
(networks, config.json, tokenizer/). convert_weights.py --overwrite replaces only such a folder,
and only when every file in it is one this project wrote: those listed in the manifest,
manifest.json itself, and the TensorRT-LLM folders written from it (trtllm/<net>/ by
convert_weights.py --trtllm, engines/<net>/ by build_*.py; both are made from the old weights,
so they go with them). Never ".", "/", the home folder, --src or a folder containing it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from models.config import ModelConfig

from ..files import sha256
from ..limits import MAX_SIDE, CheckpointError, JSONError, few, read_json
from ..networks import HUB_FILES, HUB_FOLDERS, HUB_REPO, NAMES, NETWORKS, ORIGINALS


MARKER, VERSION = "unidiffuser-model-folder", 2
MANIFEST = "manifest.json"
SMALL_FILES = ("config.json", "tokenizer/vocab.json", "tokenizer/merges.txt")
CAPTION_TOKENIZER = "caption_tokenizer"   # the caption decoder's GPT-2 tokenizer files, when it is converted
REQUIRED = tuple(NETWORKS[n].file for n in NAMES) + SMALL_FILES
# Written from the model folder by convert_weights.py --trtllm and build_*.py.
DERIVED = {f"trtllm/{n}/{f}" for n in NAMES for f in ("config.json", "rank0.safetensors")} | \
          {f"engines/{n}/{f}" for n in NAMES for f in ("config.json", "rank0.engine")}
# What --random writes in the original layouts (weights/random.py).
RANDOM_MARK = "RANDOM_WEIGHTS"
DTYPES = ("fp32", "fp16", "bf16")    # what a model folder may store
MAX_MANIFEST_BYTES = MAX_CONFIG_BYTES = 1 << 20    # a v1 manifest is 1.5 KB, its config.json 0.8 KB
# What the networks' inputs are made of, fixed by the tokenizer (tokenizer.MAX_LENGTH, VOCAB_SIZE;
# not imported: tokenizer.py imports torch) and by the text encoder (models/text_encoder.ACTIVATIONS).
TEXT_TOKENS, VOCAB_SIZE = 77, 49408
ACTIVATIONS = ("quick_gelu", "gelu")


def placement_help(src: Path) -> str:
    return (f"Place the original files like this and pass --src {src}:\n"
            + "".join(f"  {src}/{f:<24} from https://huggingface.co/{HUB_REPO}\n" for f in HUB_FILES)
            + "\n".join(f"  {src}/{d}/ {', '.join(files)}\n"
                         f"                                from https://huggingface.co/{repo}"
                         for d, repo, files in HUB_FOLDERS)
            + f"\n({HUB_FOLDERS[1][0]}/ and {HUB_FOLDERS[2][0]}/ serve the tasks that read images or write texts; "
              "text-to-image runs without them)")


def all_files(folder: Path) -> list[str]:
    """Relative paths of everything in folder that is not a directory (symlinks included)."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def read_manifest_json(model_dir: Path) -> dict:
    """The manifest as data, checked for structure (not yet against the files)."""
    path = Path(model_dir) / MANIFEST
    hint = "make the folder with convert_weights.py"
    try:
        m = read_json(path, MAX_MANIFEST_BYTES)
    except OSError as e:
        raise ValueError(f"{path}: missing or unreadable ({e.strerror or e}); not a converted model folder, {hint}") from None
    except JSONError as e:
        raise ValueError(f"{path}: {e}; {hint}") from None
    if not isinstance(m, dict) or m.get("format") != MARKER:
        old = isinstance(m, dict) and m.get("format") == 1
        raise ValueError(f"{path}: " + ("written by an older convert_weights.py (format 1: tokenizer/ and config.json "
                                        "not checksummed); re-run convert_weights.py"
                                        if old else f"not a manifest of this project (no \"format\": \"{MARKER}\"); {hint}"))
    if m.get("version") != VERSION:
        raise ValueError(f"{path}: version {m.get('version')!r}, this program reads version {VERSION}; "
                         "re-run convert_weights.py")
    files = m.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path}: \"files\" must map each file to its sha256 and size, got {type(files).__name__}; "
                         "re-run convert_weights.py")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64
                or not isinstance(entry.get("bytes"), int) or isinstance(entry.get("bytes"), bool)
                or entry["bytes"] < 0 or not name or Path(name).is_absolute() or ".." in Path(name).parts):
            raise ValueError(f"{path}: entry {name!r} is not {{\"sha256\": 64 hex digits, \"bytes\": integer}} "
                             "of a file inside the folder; re-run convert_weights.py")
    missing = [f for f in REQUIRED if f not in files]
    if missing:
        raise ValueError(f"{path}: lists no {few(missing)}; re-run convert_weights.py")
    if not isinstance(m.get("random_weights"), bool) or m.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: \"random_weights\" must be true/false and \"dtype\" fp32/fp16/bf16; "
                         "re-run convert_weights.py")
    for name in (NETWORKS[n].file for n in NAMES):   # the loader holds every tensor to this dtype
        if files[name].get("dtype") != m["dtype"]:
            raise ValueError(f"{path}: entry {name!r} has \"dtype\" {files[name].get('dtype')!r}, the folder's is "
                             f"{m['dtype']!r}; re-run convert_weights.py")
    return m


def verify_files(model_dir: Path, manifest: dict, names) -> None:
    """Each named file exists and has the manifest's sha256."""
    for name in names:
        path = Path(model_dir) / name
        if not path.is_file():
            raise ValueError(f"{path}: file not found (listed in manifest.json); re-run convert_weights.py")
        if sha256(path) != manifest["files"][name]["sha256"]:
            raise ValueError(f"{path}: sha256 does not match manifest.json (file changed or corrupt); "
                             "re-run convert_weights.py")


def foreign_files(model_dir: Path, manifest: dict) -> list[str]:
    """Files in a model folder that this project did not write."""
    ours = set(manifest.get("files", {})) | {MANIFEST} | DERIVED
    return [f for f in all_files(model_dir) if f not in ours or os.path.islink(Path(model_dir) / f)]


def _inside(a: Path, b: Path) -> bool:
    """a is b or inside b (both resolved)."""
    return a == b or b in a.parents


def check_out(out: Path, overwrite: bool, src: Path | None = None) -> None:
    """Raise ValueError unless convert_weights.py may write --out (and, with --overwrite,
    replace what is there). Runs before any conversion work."""
    out = Path(out)
    real = out.resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise ValueError(f"--out {out}: is {'the root folder' if real == Path(real.anchor) else 'your home folder'}; "
                         "give a new folder for the converted model, e.g. --out model")
    if _inside(Path.cwd().resolve(), real):
        raise ValueError(f"--out {out}: is the current folder or contains it; give a new folder, e.g. --out model")
    if src is not None and _inside(Path(src).resolve(), real):
        raise ValueError(f"--out {out}: {'is' if Path(src).resolve() == real else 'contains'} --src {src} "
                         "(the original files); give another folder for the converted model")
    if out.is_symlink():
        raise ValueError(f"--out {out}: is a symbolic link; give the folder itself")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--out {out}: exists and is not empty (pass --overwrite to replace a model folder "
                         "convert_weights.py wrote)")
    try:
        manifest = read_manifest_json(out)
    except ValueError as e:
        raise ValueError(f"--out {out}: --overwrite only replaces a model folder convert_weights.py wrote, "
                         f"and this one is not ({e}); remove it yourself or choose another --out") from None
    foreign = foreign_files(out, manifest)
    if foreign:
        raise ValueError(f"--out {out}: holds files convert_weights.py did not write ({few(foreign)}); "
                         "--overwrite would delete them. Move them, or choose another --out")


def check_random_src(src: Path) -> None:
    """--random writes into --src: only into a new or empty folder or one --random wrote."""
    src = Path(src)
    if src.exists() and not src.is_dir():
        raise ValueError(f"--src {src}: exists and is not a folder")
    if not src.exists():
        return
    files = all_files(src)
    if not files:
        return
    if RANDOM_MARK not in files:
        raise ValueError(f"--src {src}: holds files --random did not write ({few(files)}); --random would replace "
                         "them with random weights. Leave --src out (a temporary folder is used) or give a new folder")
    foreign = [f for f in files if f not in (*ORIGINALS, RANDOM_MARK)]
    if foreign:
        raise ValueError(f"--src {src}: holds files --random did not write ({few(foreign)}); give a new folder")


def check_download_src(src: Path) -> None:
    """--download writes the original files into --src: never over files the user placed there
    (a fine-tuned uvit_v1.pth, say). Files of an earlier download (huggingface_hub keeps their
    metadata in .cache/huggingface/download/) or of --random may be replaced."""
    src = Path(src)
    if src.exists() and not src.is_dir():
        raise ValueError(f"--src {src}: exists and is not a folder")
    if (src / RANDOM_MARK).is_file():
        return
    placed = []
    for rel in ORIGINALS:
        p = src / rel
        meta = p.parent / ".cache" / "huggingface" / "download" / f"{p.name}.metadata"
        if p.exists() and not meta.is_file():
            placed.append(rel)
    if placed:
        raise ValueError(f"--src {src}: already holds {few(placed)}, not from an earlier --download; --download "
                         f"would replace them. Convert them with --src {src} (without --download), or give an empty folder")


MAX_INT = 1 << 20    # no field of a buildable network is larger (v1's largest: vocab_size 49408)


def check_config_types(cfg: ModelConfig, path: Path) -> None:
    """Each field has its default's type (a hand-edited "1536" fails here, not deep in torch)."""
    for net in (n.name for n in dataclasses.fields(cfg)):
        sub = getattr(cfg, net)
        for f in dataclasses.fields(sub):
            v, d = getattr(sub, f.name), f.default
            if isinstance(d, bool) or isinstance(d, str):
                ok = type(v) is type(d)
            elif isinstance(d, int):
                ok = type(v) is int and 0 < v <= MAX_INT
            elif isinstance(d, float):
                ok = type(v) in (int, float) and 0 < v < math.inf
            else:   # tuple of positive ints
                ok = isinstance(v, tuple) and 0 < len(v) <= 8 and all(type(x) is int and 0 < x <= MAX_INT for x in v)
            if not ok:
                want = {bool: "true/false", str: "a string", int: f"a positive integer of at most {MAX_INT}",
                        float: "a positive finite number"}.get(type(d), "a list of 1 to 8 positive integers")
                raise CheckpointError(f"{path}: {net}.{f.name} must be {want}, got {v!r}; "
                                      "re-run convert_weights.py")


def read_manifest(model_dir: Path) -> tuple[ModelConfig, dict]:
    """config.json and manifest.json, checked for structure and types; no weights are read."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found (make one with convert_weights.py)")
    try:
        manifest = read_manifest_json(model_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    path = model_dir / "config.json"
    try:
        cfg = ModelConfig.from_dict(read_json(path, MAX_CONFIG_BYTES))
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: missing or unreadable ({e}); re-run convert_weights.py") from None
    check_config_types(cfg, path)
    check_config_values(cfg, path)
    return cfg, manifest


def check_config_values(cfg: ModelConfig, path: Path) -> None:
    """The fields fit together into networks that can be built and run: what would otherwise fail
    deep in torch (a head size that is not whole, a GroupNorm over channels its groups do not
    divide, text tokens the tokenizer does not make) is one line naming config.json and the field."""
    u, t, v = cfg.uvit, cfg.text_encoder, cfg.vae_decoder
    channels = sorted({v.ch * m for m in v.ch_mult})
    rules = [
        ("uvit.embed_dim", u.embed_dim % u.num_heads == 0,
         f"must be a multiple of uvit.num_heads ({u.num_heads}), got {u.embed_dim}"),
        ("uvit.patch_size", u.img_size % u.patch_size == 0,
         f"must divide uvit.img_size ({u.img_size}), got {u.patch_size}"),
        ("uvit.depth", u.depth <= 256, f"must be at most 256, got {u.depth}"),
        ("uvit.num_text_tokens", u.num_text_tokens == TEXT_TOKENS,
         f"must be {TEXT_TOKENS} (the tokenizer's length), got {u.num_text_tokens}"),
        ("uvit.text_dim", u.text_dim == t.prefix_dim,
         f"must equal text_encoder.prefix_dim ({t.prefix_dim}, the text features it reads), got {u.text_dim}"),
        ("uvit.in_chans", u.in_chans == v.embed_dim,
         f"must equal vae_decoder.embed_dim ({v.embed_dim}, the latent's channels), got {u.in_chans}"),
        ("text_encoder.hidden_size", t.hidden_size % t.num_attention_heads == 0,
         f"must be a multiple of text_encoder.num_attention_heads ({t.num_attention_heads}), got {t.hidden_size}"),
        ("text_encoder.num_hidden_layers", t.num_hidden_layers <= 256, f"must be at most 256, got {t.num_hidden_layers}"),
        ("text_encoder.max_position_embeddings", t.max_position_embeddings >= TEXT_TOKENS,
         f"must be at least {TEXT_TOKENS} (the tokenizer's length), got {t.max_position_embeddings}"),
        ("text_encoder.vocab_size", t.vocab_size >= VOCAB_SIZE,
         f"must be at least {VOCAB_SIZE} (the tokenizer's ids), got {t.vocab_size}"),
        ("text_encoder.hidden_act", t.hidden_act in ACTIVATIONS,
         f"must be one of {', '.join(ACTIVATIONS)}, got {t.hidden_act!r}"),
        ("vae_decoder.num_groups", all(c % v.num_groups == 0 for c in channels),
         f"must divide every level's channels (vae_decoder.ch x ch_mult: {channels}), got {v.num_groups}"),
        ("vae_decoder.num_res_blocks", v.num_res_blocks <= 64, f"must be at most 64, got {v.num_res_blocks}"),
        ("vae_decoder.out_ch", v.out_ch == 3, f"must be 3 (RGB images), got {v.out_ch}"),
        ("vae_decoder.ch_mult", 16 % (v.downsample * u.patch_size) == 0,
         f"has {len(v.ch_mult)} levels (a {v.downsample}x latent) and uvit.patch_size is {u.patch_size}: image sides "
         f"would have to be multiples of {v.downsample * u.patch_size}, and they are multiples of 16"),
        ("uvit.img_size", cfg.default_size <= MAX_SIDE and cfg.default_size % 16 == 0,
         f"times the decoder's {v.downsample}x makes a default image side of {cfg.default_size}, which must be a "
         f"multiple of 16 of at most {MAX_SIDE}"),
    ]
    for field, ok, why in rules:
        if not ok:
            raise CheckpointError(f"{path}: {field} {why}; re-run convert_weights.py")


def verify_small_files(model_dir: Path, manifest: dict) -> None:
    """config.json and tokenizer/ against the manifest's sha256 (the networks are checked as
    they load): a swapped id in vocab.json changes every image."""
    try:
        verify_files(model_dir, manifest, SMALL_FILES)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def require_network(model_dir: Path, manifest: dict, name: str) -> None:
    """A network of the tasks other than text-to-image is in the folder, or one line saying what to re-run."""
    if NETWORKS[name].file not in manifest["files"]:
        raise CheckpointError(f"{model_dir}: has no {NETWORKS[name].file}, which the tasks that read images or "
                              "write texts need (the folder was converted without it); re-run convert_weights.py "
                              "with the original files (--download fetches them)")
