"""What build_clip.py, build_uvit.py and build_decoder.py share, and the engine-folder contract
that the trtllm backend checks. Nothing here imports TensorRT(-LLM) at module level: argument
handling, checkpoint validation and the contract run (and are tested) on any machine.

Engine folder MODEL/engines/<net>/:
    rank0.engine   the serialized TensorRT engine
    config.json    what it was built for: network, dtype, max batch (engine rows), latent size,
                   the network's model config, the source checkpoint's sha256, plugins, versions
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from models.config import ModelConfig

from . import checkpoints, trtllm_checkpoint
from .build_args import NO_TRTLLM
from .files import atomic_write, atomic_write_text
from .folders import sha256

ENGINE_FILE, CONFIG_FILE, FORMAT = "rank0.engine", "config.json", 1
SCRIPTS = {"text_encoder": "build_clip.py", "uvit": "build_uvit.py", "vae_decoder": "build_decoder.py"}


class EngineError(ValueError):
    """A missing engine, or one built for another model, dtype, batch or size."""


# ---------------------------------------------------------------------------------------------
# Build scripts

def latent_size(args, ckpt_config: dict, default_latent: int) -> tuple[int, int]:
    """Pixels (--height/--width, multiples of 16) -> latent (h, w)."""
    f = ckpt_config["latent_factor"]
    out = []
    for name in ("height", "width"):
        v = getattr(args, name)           # checked by build_args (limits.check_side); None: the model's
        out.append((default_latent * f if v is None else v) // f)
    return out[0], out[1]


def import_tensorrt_llm():
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: {NO_TRTLLM} ({e})") from None
    return tensorrt_llm


def build_serialized(network_module, weights_path: Path, max_rows: int, fused_attention: bool):
    """Load the checkpoint into the network, trace it and build one fp16 engine.
    Builder / create_builder_config / create_network / build_engine: tensorrt_llm/builder.py;
    net_guard and Network.set_named_parameters: tensorrt_llm/network.py (as builder.build() does)."""
    from safetensors.numpy import load_file
    from tensorrt_llm.builder import Builder
    from tensorrt_llm.network import net_guard

    from models.trtllm.common import load_weights

    load_weights(network_module, load_file(str(weights_path)))
    name = type(network_module).__name__
    builder = Builder()
    builder_config = builder.create_builder_config(precision="float16", strongly_typed=True)
    network = builder.create_network()
    pc = network.plugin_config
    pc.bert_attention_plugin = "float16" if fused_attention else None
    pc.remove_input_padding = False          # padded [N, L, 3C] qkv: every row is a full sequence
    pc.context_fmha = True
    # fp32 accumulation in the fused attention, as the reference. The field is
    # `bert_context_fmha_fp32_acc` in the pydantic PluginConfig of TensorRT-LLM 1.x
    # (plugin/plugin.py: context_fmha_type reads it); older releases named it `context_fmha_fp32_acc`.
    if fused_attention:
        if hasattr(pc, "bert_context_fmha_fp32_acc"):
            pc.bert_context_fmha_fp32_acc = True
        elif hasattr(pc, "context_fmha_fp32_acc"):
            pc.context_fmha_fp32_acc = True
    pc.gemm_plugin = None                    # TensorRT's own GEMMs (fp32 accumulation via matmul's cast)
    with net_guard(network):
        network.set_named_parameters(network_module.named_parameters())
        network_module(**network_module.prepare_inputs(max_rows))
    # Builder.build_engine asserts the serialized network is not None ('Engine building failed,
    # please check the error log.') and raises RuntimeError when a weight cannot be set.
    try:
        engine = builder.build_engine(network, builder_config)
    except (AssertionError, RuntimeError) as e:
        raise EngineError(f"TensorRT could not build the {name} engine ({e}); see the TensorRT log above") from None
    if engine is None:   # only reachable under python -O, which strips that assert
        raise EngineError(f"TensorRT could not build the {name} engine; see the TensorRT log above")
    return engine


def check_output_dir(out_dir: Path) -> None:
    """An engine folder is replaced only when it holds an engine of ours (or nothing): --output-dir
    pointing at a model folder or anything else must not lose its config.json."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"--output-dir {out_dir}: not a folder")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in (CONFIG_FILE, ENGINE_FILE))
    try:
        ours = not (out_dir / CONFIG_FILE).exists() or \
            json.loads((out_dir / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if foreign or not ours:
        raise ValueError(f"--output-dir {out_dir}: holds files that are not an engine of build_*.py "
                         f"({', '.join(foreign) or CONFIG_FILE}); give an empty or new folder")


def write_engine(out_dir: Path, engine_bytes, config: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / ENGINE_FILE, lambda tmp: Path(tmp).write_bytes(bytes(engine_bytes)))
    config = {**config, "engine_bytes": (out_dir / ENGINE_FILE).stat().st_size}
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir / ENGINE_FILE


def engine_config(net: str, ckpt_config: dict, weights: Path, max_rows: int, max_images: int,
                  latent: tuple[int, int] | None, plugins: dict, build_time_s: float, versions: dict) -> dict:
    return {
        "format": FORMAT, "network": net, "dtype": "float16",
        "max_batch_size": max_rows,          # engine rows (UViT: both CFG halves)
        "max_images": max_images,
        "latent_height": latent[0] if latent else None, "latent_width": latent[1] if latent else None,
        "model_config": ckpt_config["model_config"],
        "checkpoint_sha256": sha256(weights),
        "source_sha256": ckpt_config["source"]["sha256"],
        "plugins": plugins, "build_time_s": round(build_time_s, 1), **versions,
    }


def main(net: str, args, prepare, build) -> int:
    """Common flow of build_*.py, after their arguments are checked: checkpoint and output folder
    -> prepare(args, ckpt_config) -> is TensorRT-LLM here? -> build(args, ckpt_config, weights,
    prepared) -> engine folder. Every input error is one line and exit 2, before the build."""
    try:
        ckpt_config, weights = trtllm_checkpoint.read_checkpoint(args.checkpoint_dir, net)
        check_output_dir(args.output_dir)
        prepared = prepare(args, ckpt_config)
        if importlib.util.find_spec("tensorrt_llm") is None:
            raise ValueError(NO_TRTLLM)
    except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trtllm = import_tensorrt_llm()
    t0 = time.perf_counter()
    try:
        engine, max_rows, latent, plugins = build(args, ckpt_config, weights, prepared)
    except ValueError as e:   # EngineError: TensorRT failed (1); else an input unusable here, e.g. --plugin-lib (2)
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, EngineError) else 2
    dt = time.perf_counter() - t0
    import tensorrt as trt
    versions = {"tensorrt_llm_version": trtllm.__version__, "tensorrt_version": trt.__version__}
    cfg = engine_config(net, ckpt_config, weights, max_rows, args.max_batch_size, latent, plugins, dt, versions)
    path = write_engine(args.output_dir, engine, cfg)
    print(f"built {path} in {dt:.1f} s, {path.stat().st_size / 2**20:.1f} MiB "
          f"(max {max_rows} rows{', latent %dx%d' % latent if latent else ''})")
    return 0


# ---------------------------------------------------------------------------------------------
# The engine-folder contract (checked by the trtllm backend before loading anything)

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
