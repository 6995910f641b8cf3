"""The engine folder, as build_*.py write it and the trtllm backend reads it. No TensorRT here:
the contract is checked (and tested) on any machine, before anything is loaded. Also the checks
both sides share once TensorRT-LLM is there: the supported TensorRT-LLM line
(import_tensorrt_llm) and an engine's TensorRT version (check_tensorrt_version).

Engine folder MODEL/engines/<net>/:
    rank0.engine   the serialized TensorRT engine
    config.json    what it was built for: network, dtype, max batch (engine rows), latent size,
                   the network's model config, the source checkpoint's sha256, plugins, versions
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

from models.config import ModelConfig

from ..networks import NAMES, NETWORKS

ENGINE_FILE, CONFIG_FILE, FORMAT = "rank0.engine", "config.json", 1
SCRIPTS = {n: NETWORKS[n].build_script for n in NAMES}
NO_TRTLLM = "tensorrt_llm is not installed: build engines inside the Docker image, see docs/engines.md"

# The one TensorRT-LLM line this engine path is written against, and the image that has it (the
# Dockerfile's FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_TAG}). The TensorRT-engine
# workflow it uses (tensorrt_llm.builder, tensorrt_llm.runtime.Session, functional/layers) was
# deprecated after 1.2, and later releases' main branch no longer has tensorrt_llm.builder.
TRTLLM_LINE = (1, 2)
TRTLLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"


class EngineError(ValueError):
    """A missing engine, one built for another model, dtype, batch, size or TensorRT, or a
    TensorRT-LLM other than the supported line."""


def trtllm_problem(version: str, has_builder: bool) -> str | None:
    """None for a tensorrt_llm of the supported line (1.2.x, pre-releases included) that has
    tensorrt_llm.builder; else the one-line reason, naming the image to use."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    line = ".".join(map(str, TRTLLM_LINE))
    if m is None or (int(m[1]), int(m[2])) != TRTLLM_LINE:
        return (f"tensorrt_llm {version} is installed, but the engine path needs TensorRT-LLM {line} (its "
                f"TensorRT-engine workflow was deprecated after {line}): use the image {TRTLLM_IMAGE}, see docs/engines.md")
    if not has_builder:
        return (f"tensorrt_llm {version} has no tensorrt_llm.builder (the TensorRT-engine workflow): "
                f"use the image {TRTLLM_IMAGE}, see docs/engines.md")
    return None


def import_tensorrt_llm():
    """tensorrt_llm, checked to be the supported line with its TensorRT-engine workflow; else
    EngineError, one line (the build scripts and the trtllm backend both come here)."""
    try:
        import tensorrt_llm
    except ImportError as e:
        raise EngineError(f"{NO_TRTLLM} ({e})") from None
    version = getattr(tensorrt_llm, "__version__", "(no __version__)")
    problem = trtllm_problem(version, has_builder=True)
    if problem is None:          # the right line: is its builder there? (located, not imported)
        problem = trtllm_problem(version, has_builder=_has_module("tensorrt_llm.builder"))
    if problem is not None:
        raise EngineError(problem)
    return tensorrt_llm


def _has_module(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):    # no such parent package, or a parent without __path__
        return False


def check_tensorrt_version(engine_cfg: dict, net: str, installed: str, where: str = "") -> None:
    """A serialized TensorRT engine only deserializes in the TensorRT it was built with: the
    version build_*.py recorded in config.json must be the one installed here."""
    built = engine_cfg.get("tensorrt_version")
    if built != installed:
        raise EngineError(f"{where or 'engines/' + net}: built with TensorRT {built or '(version not recorded)'}, "
                          f"this is TensorRT {installed} (an engine only loads in the TensorRT version that "
                          f"built it); rebuild it here with: python {SCRIPTS[net]} --model-dir MODEL")


def read_engine_config(engine_dir: Path, net: str) -> dict:
    d = Path(engine_dir) / net
    script = SCRIPTS[net]
    if not (d / ENGINE_FILE).is_file():
        raise EngineError(f"{d / ENGINE_FILE}: no engine; build it with: python {script} --model-dir MODEL")
    try:
        return json.loads((d / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{d / CONFIG_FILE}: missing or unreadable ({e}); rebuild with: python {script}") from None


def check_engine_config(engine_cfg: dict, net: str, cfg: ModelConfig, dtype: str = "float16",
                        rows: int | None = None, latent: tuple[int, int] | None = None, where: str = "") -> None:
    """Raise EngineError, naming the build script, when the engine does not fit this run."""
    script = SCRIPTS[net]
    where = where or f"engines/{net}"
    if engine_cfg.get("format") != FORMAT or engine_cfg.get("network") != net:
        raise EngineError(f"{where}: not a {net} engine of this project (network={engine_cfg.get('network')!r}); "
                          f"rebuild with: python {script}")
    if engine_cfg.get("model_config") != json.loads(json.dumps(cfg.to_dict()[net])):   # as stored (tuples -> lists)
        raise EngineError(f"{where}: built for another model config than the model folder's config.json; "
                          f"rebuild with: python {script} --model-dir MODEL")
    if engine_cfg.get("dtype") != dtype:
        raise EngineError(f"{where}: built for {engine_cfg.get('dtype')}, this run needs {dtype} "
                          f"(engines are fp16: pass --dtype fp16, or rebuild with python {script})")
    if rows is not None and rows > engine_cfg.get("max_batch_size", 0):
        hint = (f"{rows} engine rows (2 CFG rows per image) > its max {engine_cfg['max_batch_size']}"
                if net == "uvit" else f"batch {rows} > its max {engine_cfg.get('max_batch_size')}")
        need = (rows + 1) // 2 if net == "uvit" else rows
        raise EngineError(f"{where}: {hint}; rebuild with: python {script} --max-batch-size {need}")
    if latent is not None and (engine_cfg.get("latent_height"), engine_cfg.get("latent_width")) != tuple(latent):
        f = cfg.vae_decoder.downsample
        raise EngineError(f"{where}: built for {engine_cfg.get('latent_height', 0) * f}x"
                          f"{engine_cfg.get('latent_width', 0) * f} images, this run asks "
                          f"{latent[0] * f}x{latent[1] * f}; rebuild with: python {script} "
                          f"--height {latent[0] * f} --width {latent[1] * f}")


def check_source(engine_cfg: dict, net: str, manifest: dict) -> None:
    """The engine's weights came from this model folder's <net>.safetensors."""
    entry = manifest.get("files", {}).get(f"{net}.safetensors", {})
    if engine_cfg.get("source_sha256") != entry.get("sha256"):
        raise EngineError(f"engines/{net}: built from other weights than this model folder's {net}.safetensors; "
                          f"rebuild: python convert_weights.py ... --trtllm, then python {SCRIPTS[net]}")


def check_engines(engine_dir: Path, cfg: ModelConfig, manifest: dict, dtype: torch.dtype) -> dict[str, dict]:
    """All three engine folders exist and were built for this model and dtype (batch and image
    size are checked per call, against the same configs)."""
    if dtype != torch.float16:
        raise EngineError(f"--backend trtllm runs fp16 engines; pass --dtype fp16 (got {dtype})")
    configs = {}
    for net in NAMES:
        c = read_engine_config(engine_dir, net)
        check_engine_config(c, net, cfg, "float16", where=str(Path(engine_dir) / net))
        check_source(c, net, manifest)
        configs[net] = c
    return configs


def check_engine_files(engine_dir: Path) -> None:
    """The three engine files and their config.json are there (no model config, CUDA or
    TensorRT needed): run.py calls this before its device checks, so a missing engine is
    reported, with the script that builds it, on any machine."""
    for net in NAMES:
        read_engine_config(engine_dir, net)
