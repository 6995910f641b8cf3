"""TensorRT-LLM network of `models/vae_decoder.py` (LDM KL-f8 decoder half).

Scaled latent fp16 [N, 4, h, w] -> image fp16 [N, 3, 8h, 8w] in [-1, 1] (unclamped). Parameter
names are the converted `vae_decoder.safetensors` names (decoder.*, post_quant_conv.*). The
latent size is fixed per engine, the batch is dynamic.

GroupNorm(+SiLU): the project's TensorRT plugin "UnidiffuserGroupNorm" (plugin/, fp32 statistics,
SiLU fused) when its library is loaded (`load_group_norm_plugin`), else TensorRT's normalization
layer through `functional.group_norm`, run in fp32, then SiLU.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import tensorrt as trt
from tensorrt_llm._common import default_trtnet
from tensorrt_llm.functional import (Tensor, _create_tensor, cast, concat, expand, group_norm, shape, sigmoid,
                                     view)
from tensorrt_llm.layers import Conv2d
from tensorrt_llm.module import Module, ModuleList
from tensorrt_llm.parameter import Parameter

from models.config import VAEDecoderConfig

from .common import DTYPE, batch_input, sdpa

log = logging.getLogger("unidiffuser")

PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "UnidiffuserGroupNorm", "1", ""


def load_group_norm_plugin(lib: Path) -> bool:
    """Load plugin/build/libunidiffuser_plugins.so and report whether TensorRT's registry now
    has the GroupNorm creator. The library registers its creator when loaded (global symbols,
    as tensorrt_llm/plugin/plugin.py loads its own library); registry.load_library is the
    TensorRT 10 way for libraries that export getCreators instead."""
    lib = Path(lib)
    if not lib.is_file():
        raise FileNotFoundError(f"--plugin-lib {lib}: file not found (build it: cmake -S plugin -B plugin/build "
                                f"&& cmake --build plugin/build)")
    handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    # The engine will run the plugin on this GPU: its kernels must be built for it.
    if hasattr(handle, "unidiffuser_group_norm_device_check"):
        import torch

        from models.groupnorm import _device_check
        handle.unidiffuser_plugins_cuda_archs.restype = ctypes.c_char_p
        why = _device_check(handle, torch.cuda.current_device(), lib)
        if why:
            raise ValueError(f"--plugin-lib {why}")
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        registry.load_library(str(lib))
    return registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None


def _plugin_group_norm(x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, eps: float, silu: bool) -> Tensor:
    # IPluginV3 creator: create_plugin(name, fields, phase), added with add_plugin_v3(inputs, shape_inputs, plugin).
    creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    fields = trt.PluginFieldCollection([
        trt.PluginField("num_groups", np.array([num_groups], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("eps", np.array([eps], np.float32), trt.PluginFieldType.FLOAT32),
        trt.PluginField("silu", np.array([int(silu)], np.int32), trt.PluginFieldType.INT32),
    ])
    plugin = creator.create_plugin("unidiffuser_group_norm", fields, trt.TensorRTPhase.BUILD)
    layer = default_trtnet().add_plugin_v3([x.trt_tensor, gamma.trt_tensor, beta.trt_tensor], [], plugin)
    return _create_tensor(layer.get_output(0), layer)


class GroupNorm(Module):
    """GroupNorm over channels (NCHW), optionally followed by SiLU; params `weight`, `bias`."""

    def __init__(self, cfg: VAEDecoderConfig, channels: int, silu: bool, use_plugin: bool):
        super().__init__()
        self.num_groups, self.eps, self.silu, self.use_plugin = cfg.num_groups, cfg.eps, silu, use_plugin
        self.weight = Parameter(shape=(channels,), dtype=DTYPE)
        self.bias = Parameter(shape=(channels,), dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_plugin:
            return _plugin_group_norm(x, self.weight.value, self.bias.value, self.num_groups, self.eps, self.silu)
        y = group_norm(cast(x, "float32"), self.num_groups, cast(self.weight.value, "float32"),
                       cast(self.bias.value, "float32"), self.eps)
        if self.silu:
            y = y * sigmoid(y)
        return cast(y, x.dtype)


def conv(cin: int, cout: int, k: int) -> Conv2d:
    return Conv2d(cin, cout, kernel_size=(k, k), padding=(k // 2, k // 2), dtype=DTYPE)


class ResnetBlock(Module):
    def __init__(self, cfg: VAEDecoderConfig, cin: int, cout: int, use_plugin: bool):
        super().__init__()
        self.norm1 = GroupNorm(cfg, cin, True, use_plugin)
        self.conv1 = conv(cin, cout, 3)
        self.norm2 = GroupNorm(cfg, cout, True, use_plugin)
        self.conv2 = conv(cout, cout, 3)
        self.nin_shortcut = conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(Module):
    """Single-head self-attention over the h*w positions (head size = channels, too large for
    the fused plugin kernels: plain ops, fp32 softmax)."""

    def __init__(self, cfg: VAEDecoderConfig, channels: int, use_plugin: bool):
        super().__init__()
        self.channels = channels
        self.norm = GroupNorm(cfg, channels, False, use_plugin)
        self.q = conv(channels, channels, 1)
        self.k = conv(channels, channels, 1)
        self.v = conv(channels, channels, 1)
        self.proj_out = conv(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = shape(x, 0), self.channels, x.shape[2], x.shape[3]
        h = self.norm(x)
        # [N, C, H, W] -> [N, 1, H*W, C]: one head, as the reference's [:, None]
        q, k, v = (view(m(h), concat([N, C, H * W])).permute([0, 2, 1]) for m in (self.q, self.k, self.v))
        q, k, v = (view(t, concat([N, 1, H * W, C])) for t in (q, k, v))
        h = sdpa(q, k, v, C ** -0.5)
        h = view(view(h, concat([N, H * W, C])).permute([0, 2, 1]), concat([N, C, H, W]))
        return x + self.proj_out(h)


def upsample_nearest2x(x: Tensor) -> Tensor:
    """F.interpolate(scale_factor=2, mode='nearest') with a dynamic batch: each pixel expanded
    to a 2x2 block (functional.interpolate needs fully static shapes)."""
    N, C, H, W = shape(x, 0), x.shape[1], x.shape[2], x.shape[3]
    x = view(x, concat([N, C, H, 1, W, 1]))
    x = expand(x, concat([N, C, H, 2, W, 2]))
    return view(x, concat([N, C, 2 * H, 2 * W]))


class Upsample(Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest2x(x))


class Mid(Module):
    def __init__(self, cfg: VAEDecoderConfig, ch: int, use_plugin: bool):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, ch, ch, use_plugin)
        self.attn_1 = AttnBlock(cfg, ch, use_plugin)
        self.block_2 = ResnetBlock(cfg, ch, ch, use_plugin)


class UpLevel(Module):
    def __init__(self, blocks: list, upsample: Upsample | None):
        super().__init__()
        self.block = ModuleList(blocks)
        self.upsample = upsample


class Decoder(Module):
    def __init__(self, cfg: VAEDecoderConfig, use_plugin: bool):
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv(cfg.z_channels, block_in, 3)
        self.mid = Mid(cfg, block_in, use_plugin)
        up = []
        for i in reversed(range(levels)):          # same construction order as the reference
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, block_in, block_out, use_plugin))
                block_in = block_out
            up.insert(0, UpLevel(blocks, Upsample(block_in) if i != 0 else None))
        self.up = ModuleList(up)
        self.norm_out = GroupNorm(cfg, block_in, True, use_plugin)
        self.conv_out = conv(block_in, cfg.out_ch, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(self.norm_out(h))


class VAEDecoder(Module):
    def __init__(self, cfg: VAEDecoderConfig, latent_height: int, latent_width: int, use_plugin: bool = False):
        super().__init__()
        self.cfg, self.latent_height, self.latent_width = cfg, latent_height, latent_width
        self.post_quant_conv = conv(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg, use_plugin)

    def forward(self, z: Tensor) -> Tensor:
        image = self.decoder(self.post_quant_conv(z * (1.0 / self.cfg.scale_factor)))
        image.mark_output("image", DTYPE)
        return image

    def prepare_inputs(self, max_batch_size: int) -> dict:
        z = batch_input("z", trt.float16, [self.cfg.embed_dim, self.latent_height, self.latent_width],
                        ["latent_channels", "latent_height", "latent_width"], max_batch_size)
        return {"z": z}
