"""What build_clip.py, build_uvit.py and build_decoder.py share: checkpoint -> TensorRT-LLM network
-> engine folder (backends/engine_folder.py says what it holds). Nothing here imports
TensorRT(-LLM) at module level: argument handling and checkpoint validation run (and are tested)
on any machine; the engine build itself runs inside the TensorRT-LLM 1.2 image (docs/engines.md)."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path


from ..backends.engine_folder import CONFIG_FILE, ENGINE_FILE, FORMAT, NO_TRTLLM, EngineError, import_tensorrt_llm
from ..files import atomic_write, atomic_write_text
from ..weights.folders import CheckpointError, sha256
from . import checkpoint

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


# tensorrt_llm/plugin/plugin.py (1.2), PluginConfig.validate(): on these SM versions
# (tensorrt_llm._utils.get_sm_version(): major * 10 + minor of GPU 0) it raises NotImplementedError
# for bert_context_fmha_fp32_acc=True. Only SM 100 is listed: SM 103, 110, 120, 121 keep fp32
# accumulation.
FMHA_FP32_ACC_UNSUPPORTED_SM = frozenset({100})


def fmha_fp32_acc_supported(sm: int) -> bool:
    """Whether TensorRT-LLM 1.2 accepts fp32 accumulation in the fused (context FMHA) attention on SM `sm`."""
    return sm not in FMHA_FP32_ACC_UNSUPPORTED_SM


def sm_version() -> int:
    """The SM version TensorRT-LLM's own checks use (device 0)."""
    from tensorrt_llm._utils import get_sm_version
    return get_sm_version()


def build_serialized(network_module, weights_path: Path, max_rows: int, fused_attention: bool):
    """Load the checkpoint into the network, trace it and build one fp16 engine.
    Builder / create_builder_config / create_network / build_engine: tensorrt_llm/builder.py;
    net_guard and Network.set_named_parameters: tensorrt_llm/network.py (as builder.build() does)."""
    from safetensors.numpy import load_file
    from tensorrt_llm.builder import Builder
    from tensorrt_llm.network import net_guard

    from models.trtllm.common import load_weights

    name = type(network_module).__name__
    load_weights(network_module, load_file(str(weights_path)))
    builder = Builder()
    builder_config = builder.create_builder_config(precision="float16", strongly_typed=True)
    network = builder.create_network()
    pc = network.plugin_config
    pc.bert_attention_plugin = "float16" if fused_attention else None
    pc.remove_input_padding = False          # padded [N, L, 3C] qkv: every row is a full sequence
    pc.context_fmha = True
    # fp32 accumulation in the fused attention, as the reference, where TensorRT-LLM allows it
    # (fmha_fp32_acc_supported; else its fp16 accumulation). The field is
    # `bert_context_fmha_fp32_acc` in the pydantic PluginConfig of TensorRT-LLM 1.x
    # (plugin/plugin.py: context_fmha_type reads it); older releases named it `context_fmha_fp32_acc`.
    if fused_attention and fmha_fp32_acc_supported(sm_version()):
        if hasattr(pc, "bert_context_fmha_fp32_acc"):
            pc.bert_context_fmha_fp32_acc = True
        elif hasattr(pc, "context_fmha_fp32_acc"):
            pc.context_fmha_fp32_acc = True
    pc.gemm_plugin = None                    # TensorRT's own GEMMs (fp32 accumulation via matmul's cast)
    # The plugin-per-GPU rules trtllm-build applies (PluginConfig.validate, tensorrt_llm/commands/build.py);
    # Builder.build_engine does not call it, so a setting the GPU does not support fails here, in one line.
    if hasattr(pc, "validate"):
        try:
            pc.validate()
        except NotImplementedError as e:
            raise EngineError(f"TensorRT-LLM rejects the {name} engine's plugin settings on this GPU ({e})") from None
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
    -> prepare(args, ckpt_config) -> is TensorRT-LLM 1.2 here? -> build(args, ckpt_config, weights,
    prepared) -> engine folder. Every input error is one line and exit 2, before the build."""
    try:
        ckpt_config, weights = checkpoint.read_checkpoint(args.checkpoint_dir, net)
        check_output_dir(args.output_dir)
        prepared = prepare(args, ckpt_config)
        if importlib.util.find_spec("tensorrt_llm") is None:
            raise ValueError(NO_TRTLLM)
        trtllm = import_tensorrt_llm()       # EngineError unless the 1.2 line with tensorrt_llm.builder
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
