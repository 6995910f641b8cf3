"""The networks as TensorRT-LLM fp16 engines (MODEL/engines/<net>/, built by build_*.py).

Same interface as pipeline.TorchBackend; tokenizer, noise, sampler and CFG stay in the shared
pipeline (torch, on the GPU). Engines run through tensorrt_llm.runtime.Session
(tensorrt_llm/runtime/session.py: from_serialized_engine, infer_shapes(TensorInfo), run(inputs,
outputs, stream)). The UViT call, 50 per image, is replayed from a CUDA graph per batch size:
enqueueV3 only launches work on the stream (no host sync), so it can be captured once the
input shapes are set and one warm-up run has happened.

tensorrt_llm is imported in TrtllmBackend.__init__ only: the engine-folder contract checks
(engine_build.check_engine_config) run, and are tested, without it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from models.config import ModelConfig

from .engine_build import (NO_TRTLLM, EngineError, check_engine_config, check_source, read_engine_config)

log = logging.getLogger("unidiffuser")


def check_engines(engine_dir: Path, cfg: ModelConfig, manifest: dict, dtype: torch.dtype) -> dict[str, dict]:
    """All three engine folders exist and were built for this model and dtype (batch and image
    size are checked per call, against the same configs)."""
    if dtype != torch.float16:
        raise EngineError(f"--backend trtllm runs fp16 engines; pass --dtype fp16 (got {dtype})")
    configs = {}
    for net in ("text_encoder", "uvit", "vae_decoder"):
        c = read_engine_config(engine_dir, net)
        check_engine_config(c, net, cfg, "float16", where=str(Path(engine_dir) / net))
        check_source(c, net, manifest)
        configs[net] = c
    return configs


class _Engine:
    """One engine, its Session, and the output buffers of the last shapes it ran."""

    def __init__(self, path: Path, name: str):
        from tensorrt_llm.runtime.session import Session
        self.name = name
        self.session = Session.from_serialized_engine(Path(path).read_bytes())
        self.graphs: dict[tuple, tuple] = {}

    def _outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import tensorrt as trt
        from tensorrt_llm._utils import trt_dtype_to_torch
        from tensorrt_llm.runtime.session import TensorInfo
        to_trt = {torch.float16: trt.float16, torch.float32: trt.float32, torch.int32: trt.int32}  # as Session._debug_run
        infos = [TensorInfo(k, to_trt[v.dtype], tuple(v.shape)) for k, v in inputs.items()]
        out = self.session.infer_shapes(infos)
        if out is None:
            raise EngineError(f"{self.name}: the engine rejected input shapes {[i.shape for i in infos]}")
        return {o.name: torch.empty(tuple(o.shape), dtype=trt_dtype_to_torch(o.dtype), device="cuda") for o in out}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {k: v.contiguous() for k, v in inputs.items()}
        outputs = self._outputs(inputs)
        stream = torch.cuda.current_stream()
        if not self.session.run(inputs, outputs, stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT enqueue failed")
        return outputs

    def graphed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Static input/output buffers per shape, filled and replayed; falls back to eager
        execution (logged once) if capture fails."""
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        entry = self.graphs.get(key)
        if entry is None:
            static_in = {k: v.clone().contiguous() for k, v in inputs.items()}
            static_out = self._outputs(static_in)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = None
            with torch.cuda.stream(stream):
                self.session.run(static_in, static_out, stream.cuda_stream)    # warm-up after set-shape
                stream.synchronize()
                try:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, stream=stream):
                        self.session.run(static_in, static_out, stream.cuda_stream)
                    graph = g
                except RuntimeError as e:
                    log.warning("%s: CUDA graph capture failed (%s); running without graphs", self.name, e)
            torch.cuda.current_stream().wait_stream(stream)
            entry = self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        if graph is None:
            return self(inputs)
        for k, v in inputs.items():
            static_in[k].copy_(v)
        # The replay uses the captured pointers and the context's scratch memory, whatever shapes
        # the context was set to since: one context, calls serialized on one stream.
        graph.replay()
        return static_out


class TrtllmBackend:
    name = "trtllm"

    def __init__(self, model_dir: Path, cfg: ModelConfig, manifest: dict, device: torch.device,
                 dtype: torch.dtype, engine_dir: Path | None = None):
        if device.type != "cuda":
            raise EngineError(f"--backend trtllm needs a CUDA device (got --device {device})")
        self.engine_dir = Path(engine_dir) if engine_dir is not None else Path(model_dir) / "engines"
        self.configs = check_engines(self.engine_dir, cfg, manifest, dtype)
        try:
            import tensorrt_llm  # noqa: F401  (also registers TensorRT-LLM's own plugins)
        except ImportError as e:
            raise EngineError(f"{NO_TRTLLM} ({e})") from None
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self._load_plugin_lib(self.configs["vae_decoder"])
        self.engines = {net: _Engine(self.engine_dir / net / "rank0.engine", net) for net in self.configs}
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
        # Graph outputs are static buffers, overwritten by the next call: hand out copies.
        return out["img_out"].clone(), out["clip_img_out"].clone()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check("vae_decoder", z.shape[0], tuple(z.shape[2:]))
        return self.engines["vae_decoder"]({"z": z.half()})["image"]
