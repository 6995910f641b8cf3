"""The networks as TensorRT-LLM fp16 engines (MODEL/engines/<net>/, built by build_*.py).

Same interface as pipeline.TorchBackend; tokenizer, noise, sampler and CFG stay in the shared
pipeline (torch, on the GPU). Engines run through tensorrt_llm.runtime.Session
(tensorrt_llm/runtime/session.py: from_engine, infer_shapes(TensorInfo), run(inputs, outputs,
stream, context)), each engine deserialized and checked first (deserialize). The UViT call, 50 per image, is replayed from a CUDA graph per input
shape: enqueueV3 only launches work on the stream (no host sync), so it can be captured once the
input shapes are set and one warm-up run has happened. Each captured shape has its own execution
context, because a context reconfigures its plugins whenever its shapes change, and a graph
must replay against the configuration it was captured with.

Every engine call is enqueued on one CUDA stream of the backend's own (on its device), not on
the legacy default stream (where TensorRT warns and adds synchronizations): that stream first
waits for the caller's current stream (the inputs), and the caller's stream waits for it after
the call (the outputs). Buffers are allocated on the caller's stream, so the allocator's stream
bookkeeping stays the caller's.

tensorrt_llm is imported in TrtllmBackend.__init__ only (engine_folder.import_tensorrt_llm: the
1.2 line, with tensorrt_llm.builder): the engine-folder contract checks (engine_folder.py) run,
and are tested, without it. Each engine's recorded TensorRT version is compared with the
installed one before it is deserialized.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from models.config import ModelConfig

from .engine_folder import (SCRIPTS, EngineError, check_engine_config, check_engines, check_tensorrt_version,
                            import_tensorrt_llm)

log = logging.getLogger("unidiffuser")


def replay_matches(graph_out: dict[str, torch.Tensor], eager_out: dict[str, torch.Tensor], tol: float = 1e-3) -> bool:
    """A graph replay reproduces the eager run: every output within `tol` of the eager one,
    relative to its RMS (the same engine and inputs, so in practice bit-identical)."""
    for name, want in eager_out.items():
        got = graph_out.get(name)
        if got is None or got.shape != want.shape:
            return False
        a, b = got.float(), want.float()
        if not torch.isfinite(a).all() or (a - b).norm() > tol * b.norm().clamp_min(1e-6):
            return False
    return True


class _Graph:
    """One captured shape: its own execution context (TensorRT plugins are configured per
    context for its shapes), static input/output buffers and the CUDA graph."""

    def __init__(self, graph, context, static_in, static_out):
        self.graph, self.context, self.static_in, self.static_out = graph, context, static_in, static_out
        self.verified = False


_EAGER = object()   # graphs[key] for a shape that runs eagerly (capture failed or replay mismatched)


@contextlib.contextmanager
def ordered_on(stream):
    """Enqueue on `stream`, ordered after what the caller's current stream has queued (the
    inputs), with the caller's stream waiting for it on the way out (the outputs), also when
    the body raises. Yields the caller's stream. The current stream is not changed."""
    with torch.cuda.device(stream.device):
        caller = torch.cuda.current_stream(stream.device)
        stream.wait_stream(caller)
        try:
            yield caller
        finally:
            caller.wait_stream(stream)


def deserialize(path: Path, net: str):
    """The engine file as a tensorrt_llm Session. Session.from_serialized_engine (runtime/session.py)
    does not check trt.Runtime.deserialize_cuda_engine's result: when TensorRT cannot read the
    engine (another TensorRT version, GPU or plugin library; TensorRT logs why) that is None and
    Session._init then fails on None.streamable_weights_size (AttributeError). So the engine is
    deserialized here, checked, and given to Session.from_engine; the runtime is kept with it."""
    import tensorrt as trt
    from tensorrt_llm.logger import logger
    from tensorrt_llm.runtime.session import Session
    rebuild = f"rebuild it with: python {SCRIPTS[net]} --model-dir MODEL"
    runtime = trt.Runtime(logger.trt_logger)
    try:
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    except (RuntimeError, TypeError, ValueError) as e:
        engine, why = None, f" ({e})"
    else:
        why = ""
    if engine is None:
        raise EngineError(f"{path}: TensorRT {trt.__version__} could not deserialize the engine{why} (see the TensorRT "
                          f"error above: built by another TensorRT, for another GPU, or with another plugin library); "
                          f"{rebuild}")
    try:
        session = Session.from_engine(engine)   # creates the default execution context, profile 0
    except AssertionError as e:                 # 'Failed to create an execution context!'
        raise EngineError(f"{path}: TensorRT could not create an execution context ({e}; out of GPU memory?)") from None
    return runtime, session


class _Engine:
    """One engine, its Session, and one CUDA graph per input shape; every call enqueued on
    `stream` (the backend's), outputs allocated on `device`.

    tensorrt_llm/runtime/session.py: infer_shapes(infos, context) raises (ValueError for a wrong
    tensor/dtype, RuntimeError "Could not set shape" outside the profile); run(inputs, outputs,
    stream, context) returns execute_async_v3's bool. Session.context is the default context;
    more come from session.engine.create_execution_context(), set to profile 0 as Session._init
    does."""

    def __init__(self, path: Path, name: str, stream, device: torch.device, session=None):
        self.name, self.stream, self.device = name, stream, torch.device(device)
        if session is None:
            self._runtime, session = deserialize(path, name)
        self.session = session
        self.graphs: dict[tuple, object] = {}

    def _outputs(self, inputs: dict[str, torch.Tensor], context=None) -> dict[str, torch.Tensor]:
        import tensorrt as trt
        from tensorrt_llm._utils import trt_dtype_to_torch
        from tensorrt_llm.runtime.session import TensorInfo
        to_trt = {torch.float16: trt.float16, torch.float32: trt.float32, torch.int32: trt.int32}  # as Session._debug_run
        infos = [TensorInfo(k, to_trt[v.dtype], tuple(v.shape)) for k, v in inputs.items()]
        try:
            out = self.session.infer_shapes(infos, context=context)
        except (RuntimeError, ValueError) as e:
            raise EngineError(f"{self.name}: the engine rejected inputs {[(i.name, i.shape) for i in infos]} ({e}); "
                              f"rebuild it with: python {SCRIPTS[self.name]}") from None
        return {o.name: torch.empty(tuple(o.shape), dtype=trt_dtype_to_torch(o.dtype), device=self.device) for o in out}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eager run on the session's default context, enqueued on the engine stream."""
        inputs = {k: v.contiguous() for k, v in inputs.items()}
        outputs = self._outputs(inputs)
        with ordered_on(self.stream):
            ok = self.session.run(inputs, outputs, self.stream.cuda_stream)
        if not ok:
            raise EngineError(f"{self.name}: TensorRT could not enqueue the engine (see the TensorRT log above)")
        return outputs

    def _capture(self, inputs: dict[str, torch.Tensor]) -> _Graph | None:
        """A new context for this shape, one warm-up run, then the capture, all on the engine
        stream; None (logged) if any step fails, and the shape then runs eagerly."""
        context = self.session.engine.create_execution_context()
        if context is None:
            log.warning("%s: no execution context for a CUDA graph (out of memory?); running without graphs", self.name)
            return None
        stream = self.stream
        static_in = {k: v.clone().contiguous() for k, v in inputs.items()}    # on the caller's stream
        try:
            static_out = self._outputs(static_in, context)
            with ordered_on(stream):
                context.set_optimization_profile_async(0, stream.cuda_stream)
                # Warm-up after the shapes are set: plugins configure and allocate here, not in the graph.
                if not self.session.run(static_in, static_out, stream.cuda_stream, context=context):
                    log.warning("%s: TensorRT enqueue failed before CUDA graph capture; running without graphs", self.name)
                    return None
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    ok = self.session.run(static_in, static_out, stream.cuda_stream, context=context)
                if not ok:   # the graph would replay stale outputs
                    log.warning("%s: TensorRT enqueue failed during CUDA graph capture; running without graphs", self.name)
                    return None
        except RuntimeError as e:
            log.warning("%s: CUDA graph capture failed (%s); running without graphs", self.name, e)
            return None
        return _Graph(graph, context, static_in, static_out)

    def graphed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replay this shape's CUDA graph (captured on first use). The first replay is checked
        against an eager run; a failed capture or a mismatch makes the shape eager, logged once.
        The returned buffers are the graph's: overwritten by the next call of the same shape."""
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs) or _EAGER
        if entry is _EAGER:
            return self(inputs)
        for k, v in inputs.items():
            entry.static_in[k].copy_(v)          # on the caller's stream; the replay waits for it
        with ordered_on(self.stream), torch.cuda.stream(self.stream):
            entry.graph.replay()
        if not entry.verified:
            eager = self(inputs)
            if not replay_matches(entry.static_out, eager):
                log.warning("%s: the CUDA graph's first replay differs from an eager run; running without graphs "
                            "for inputs %s", self.name, [(k, s) for k, s, _ in key])
                self.graphs[key] = _EAGER
                return eager
            entry.verified = True
        return entry.static_out


class TrtllmBackend:
    name = "trtllm"

    def __init__(self, model_dir: Path, cfg: ModelConfig, manifest: dict, device: torch.device,
                 dtype: torch.dtype, engine_dir: Path | None = None):
        # The engine folder first: its errors name the build step, useful on any machine.
        self.engine_dir = Path(engine_dir) if engine_dir is not None else Path(model_dir) / "engines"
        self.configs = check_engines(self.engine_dir, cfg, manifest, dtype)
        if device.type != "cuda":
            raise EngineError(f"--backend trtllm needs a CUDA device (got --device {device})")
        import_tensorrt_llm()     # the 1.2 line, else one line naming the image (also registers its plugins)
        import tensorrt as trt
        for net, c in self.configs.items():      # before any deserialization
            check_tensorrt_version(c, net, trt.__version__, where=str(self.engine_dir / net))
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self._load_plugin_lib(self.configs["vae_decoder"])
        # One stream per backend, on its device, for every engine call (ordered_on).
        self.stream = torch.cuda.Stream(device=device)
        with torch.cuda.device(device):          # engines and contexts live on the backend's device
            self.engines = {net: _Engine(self.engine_dir / net / "rank0.engine", net, self.stream, device)
                            for net in self.configs}
        self.cuda_graphs = os.environ.get("UNIDIFFUSER_TRT_CUDA_GRAPH", "1") != "0"

    @staticmethod
    def _load_plugin_lib(decoder_cfg: dict) -> None:
        lib = decoder_cfg.get("plugins", {}).get("plugin_lib")
        if lib is None:
            return
        lib = os.environ.get("UNIDIFFUSER_PLUGIN_LIB", lib)
        if not Path(lib).is_file():
            raise EngineError(f"the vae_decoder engine uses the GroupNorm plugin, but {lib} is missing "
                              f"(build it, or set UNIDIFFUSER_PLUGIN_LIB, or rebuild with build_decoder.py "
                              f"without --plugin-lib)")
        from models.trtllm.vae_decoder import load_group_norm_plugin   # dlopen, else registry.load_library
        if not load_group_norm_plugin(Path(lib)):
            raise EngineError(f"{lib}: loaded, but TensorRT has no UnidiffuserGroupNorm v1 creator")

    def _check(self, net: str, rows: int, latent=None) -> None:
        check_engine_config(self.configs[net], net, self.cfg, "float16", rows=rows, latent=latent,
                            where=str(self.engine_dir / net))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check("text_encoder", input_ids.shape[0])
        return self.engines["text_encoder"]({"input_ids": input_ids.to(self.device, torch.int32)})["text"]

    def uvit(self, z, clip_img, text, t_img, t_text, data_type):
        rows, (H, W) = z.shape[0], z.shape[2:]
        self._check("uvit", rows, (H, W))
        inputs = {"img": z.half(), "clip_img": clip_img.half(), "text": text.half(),
                  "t_img": t_img.float(), "t_text": t_text.float(), "data_type": data_type.to(torch.int32)}
        engine = self.engines["uvit"]
        out = engine.graphed(inputs) if self.cuda_graphs else engine(inputs)
        # Graph outputs are static buffers, overwritten by the next call: hand out copies. The
        # engine has no text output: it serves text-to-image, whose state is the image stream.
        return out["img_out"].clone(), out["clip_img_out"].clone(), None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check("vae_decoder", z.shape[0], tuple(z.shape[2:]))
        return self.engines["vae_decoder"]({"z": z.half()})["image"]
