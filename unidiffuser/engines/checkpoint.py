"""TensorRT-LLM checkpoint folders from the converted model folder (no TensorRT needed).

    MODEL/trtllm/<net>/config.json       architecture, dtype, mapping, the network's fields
    MODEL/trtllm/<net>/rank0.safetensors the converted weights under their own names, fp16

The layout is the one TensorRT-LLM's examples write (e.g. examples/models/contrib/dit/
convert_checkpoint.py: config.json + rank{N}.safetensors per folder, a single rank here). The
names are the PyTorch reference modules' state-dict names, which the engine networks in
models/trtllm/ reuse, so building is a name-for-name copy.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import ModelConfig

from ..files import atomic_write, atomic_write_text
from ..networks import NAMES, NETWORKS, build
from ..weights.folders import CheckpointError, read_manifest
from ..weights.loading import load_network

FORMAT = 1
DTYPE = "float16"
ARCHITECTURES = {n: NETWORKS[n].architecture for n in NAMES}
WEIGHTS_FILE, CONFIG_FILE = "rank0.safetensors", "config.json"
# The UViT MLP's activation as computed: exact (erf) GELU, F.gelu in models/uvit.py and
# trt.ActivationType.GELU_ERF in models/trtllm/common.py. Not "gelu": in TensorRT-LLM's
# functional.py, gelu() and ACT2FN["gelu"] are the tanh approximation.
UVIT_HIDDEN_ACT = "gelu_erf"
CONVERT_HINT = "make it with: python convert_weights.py ... --trtllm (or unidiffuser.engines.checkpoint.write_all)"


def expected_tensors(name: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a network's checkpoint: the reference torch module's parameters
    (buffers such as CLIP's position_ids are recomputed in the engine, never stored)."""
    return {k: tuple(p.shape) for k, p in build(name, cfg).named_parameters()}


def network_fields(name: str, cfg: ModelConfig) -> dict:
    """The network's own config (models/config.py) plus the generic fields TensorRT-LLM's
    PretrainedConfig carries (tensorrt_llm/models/modeling_utils.py)."""
    if name == "text_encoder":
        c = cfg.text_encoder
        return {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
                "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
                "norm_epsilon": c.layer_norm_eps, "model_config": cfg.to_dict()["text_encoder"]}
    if name == "uvit":
        c = cfg.uvit
        return {"hidden_size": c.embed_dim, "num_attention_heads": c.num_heads, "num_hidden_layers": c.depth,
                "hidden_act": UVIT_HIDDEN_ACT, "norm_epsilon": 1e-5, "latent_factor": cfg.vae_decoder.downsample,
                "model_config": cfg.to_dict()["uvit"]}
    c = cfg.vae_decoder
    return {"num_groups": c.num_groups, "norm_epsilon": c.eps, "latent_factor": c.downsample,
            "default_latent": cfg.uvit.img_size,
            "model_config": cfg.to_dict()["vae_decoder"]}


def checkpoint_config(name: str, cfg: ModelConfig, source_sha256: str) -> dict:
    return {
        "architecture": ARCHITECTURES[name],
        "dtype": DTYPE,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "network": name,
        "format": FORMAT,
        "source": {"file": f"{name}.safetensors", "sha256": source_sha256},
        **network_fields(name, cfg),
    }


def write_network(model_dir: Path, name: str, cfg: ModelConfig, manifest: dict, out: Path, verify: bool = True) -> Path:
    """One checkpoint folder, written beside its final place and renamed into it. verify=False
    skips the sha256 (for a folder whose files were hashed as they were written)."""
    sd = load_network(model_dir, name, cfg, manifest, verify)   # sha256 + names + shapes checked
    want = expected_tensors(name, cfg)
    tensors = {k: sd[k].to(torch.float16).contiguous() for k in want}   # drops non-parameter buffers
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        atomic_write(tmp / WEIGHTS_FILE, partial(save_file, tensors, metadata={"network": name, "dtype": DTYPE}))
        src_sha = manifest["files"][f"{name}.safetensors"]["sha256"]
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(checkpoint_config(name, cfg, src_sha), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def write_all(model_dir: Path, out_root: Path | None = None, verify: bool = True) -> dict[str, Path]:
    model_dir = Path(model_dir)
    cfg, manifest = read_manifest(model_dir)
    out_root = Path(out_root) if out_root is not None else model_dir / "trtllm"
    return {n: write_network(model_dir, n, cfg, manifest, out_root / n, verify) for n in NAMES}


def read_checkpoint(ckpt_dir: Path, name: str) -> tuple[dict, Path]:
    """Validate a checkpoint folder (before anything imports TensorRT): its config.json names
    this network and the weights file is there. Returns (config, weights path)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"--checkpoint-dir {ckpt_dir}: not found; {CONVERT_HINT}")
    try:
        config = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}/{CONFIG_FILE}: missing or unreadable ({e}); {CONVERT_HINT}") from None
    if config.get("network") != name or config.get("architecture") != ARCHITECTURES[name]:
        raise CheckpointError(
            f"{ckpt_dir}: a checkpoint of {config.get('network')!r} ({config.get('architecture')}), expected "
            f"{name!r} ({ARCHITECTURES[name]}); pass the {name} folder, MODEL/trtllm/{name}")
    if config.get("format") != FORMAT or config.get("dtype") != DTYPE or "model_config" not in config:
        raise CheckpointError(f"{ckpt_dir}/{CONFIG_FILE}: format/dtype/model_config not as this "
                                          f"version writes them; {CONVERT_HINT}")
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found; {CONVERT_HINT}")
    return config, weights
