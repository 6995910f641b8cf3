"""Fused GroupNorm(+SiLU) from plugin/ (libunidiffuser_plugins.so), called through ctypes.

The kernel accumulates statistics in fp32 (fp64 for the final merge), so fp16 activations with a
large mean keep their accuracy, and fuses normalize + affine + SiLU into one pass. Both contiguous
NCHW and channels_last inputs work; the output keeps the input's layout.

Everything runs on torch's current stream with a workspace from torch's caching allocator, so the
call is safe inside CUDA-graph capture (run it once before capturing, like any kernel, so the
library's module is loaded).

Import is safe without CUDA: `available()` then returns False.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("unidiffuser")

_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIB = _ROOT / "plugin" / "build" / "libunidiffuser_plugins.so"
BUILD_CMD = "cmake -S plugin -B plugin/build && cmake --build plugin/build"

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NCHW, _NHWC = 0, 1

_lib: Optional[ctypes.CDLL] = None
_checked = False
_why_not = ""


def library_path() -> Path:
    return Path(os.environ.get("UNIDIFFUSER_PLUGIN_LIB", str(DEFAULT_LIB)))


def _load() -> Optional[ctypes.CDLL]:
    """Load the library once; remember why not (logged once by available())."""
    global _lib, _checked, _why_not
    if _checked:
        return _lib
    _checked = True
    if not torch.cuda.is_available():
        _why_not = "CUDA is not available"
        return None
    path = library_path()
    if not path.is_file():
        _why_not = f"{path} not found (build it: {BUILD_CMD}; or set UNIDIFFUSER_PLUGIN_LIB)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
        run = lib.unidiffuser_group_norm
        ws = lib.unidiffuser_group_norm_workspace_size
        err = lib.unidiffuser_group_norm_error_string
        check = lib.unidiffuser_group_norm_device_check
        archs = lib.unidiffuser_plugins_cuda_archs
    except (OSError, AttributeError) as e:
        _why_not = f"cannot load {path}: {e} (rebuild it: {BUILD_CMD})"
        return None
    c_int, c_void, c_size = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    run.argtypes = [c_void, c_void, c_void, c_void] + [c_int] * 5 + [ctypes.c_float, c_int, c_int, c_int,
                                                                     c_void, c_size, c_void]
    run.restype = c_int
    ws.argtypes = [c_int] * 7
    ws.restype = c_size
    err.argtypes = []
    err.restype = ctypes.c_char_p
    check.argtypes = [c_int, ctypes.POINTER(c_int), ctypes.POINTER(c_int)]
    check.restype = c_int
    archs.argtypes = []
    archs.restype = ctypes.c_char_p
    _why_not = _device_check(lib, torch.cuda.current_device(), path)
    if _why_not:
        return None
    _lib = lib
    return _lib


def _device_check(lib: ctypes.CDLL, device: int, path: Path) -> str:
    """'' when the library has a kernel this GPU can run (SASS for its architecture, or PTX the
    driver compiles), else the reason, naming the build option that adds it."""
    binary, ptx = ctypes.c_int(0), ctypes.c_int(0)
    if lib.unidiffuser_group_norm_device_check(device, ctypes.byref(binary), ctypes.byref(ptx)) == 0:
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    built = lib.unidiffuser_plugins_cuda_archs().decode(errors="replace")
    return (f"{path} has no kernel for this GPU (sm_{major}{minor}; built for {built}); rebuild it with "
            f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}-real, or with the default targets")


def available() -> bool:
    """True when CUDA is present and the plugin library loaded; logs one line when it is not."""
    global _why_not
    lib = _load()
    if lib is None and _why_not:
        log.warning("fused GroupNorm unavailable, using torch's group_norm: %s", _why_not)
        _why_not = ""  # log once
    return lib is not None


def _layout(x: torch.Tensor) -> int:
    if x.is_contiguous():
        return _NCHW
    if x.is_contiguous(memory_format=torch.channels_last):
        return _NHWC
    raise RuntimeError(f"group_norm: x must be contiguous NCHW or channels_last, got strides {tuple(x.stride())}")


def group_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
               eps: float, silu: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then F.silu when `silu`, in one fused kernel.

    x: 4-D CUDA tensor, float16 / bfloat16 / float32, contiguous NCHW or channels_last (a tensor that
    is both, e.g. 1x1 spatial, is treated as NCHW). weight/bias: [C] or None; cast to x's dtype if
    they differ. out: optional preallocated output with x's shape, dtype and memory layout.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"fused group_norm unavailable: {_why_not or 'see the earlier log line'}")
    if x.dim() != 4 or not x.is_cuda or x.dtype not in _DTYPES:
        raise RuntimeError(f"group_norm: expected a 4-D CUDA float16/bfloat16/float32 tensor, got "
                           f"{x.dim()}-D {x.dtype} on {x.device}")
    n, c, h, w = x.shape
    layout = _layout(x)
    fmt = torch.channels_last if layout == _NHWC else torch.contiguous_format
    if out is None:
        out = torch.empty_like(x, memory_format=fmt)
    elif (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous(memory_format=fmt)):
        raise RuntimeError("group_norm: out must match x's shape, dtype, device and memory layout")

    keep: list = []  # converted parameters stay alive until the launch is queued

    def param(p: Optional[torch.Tensor], name: str) -> int:
        if p is None:
            return 0
        if p.numel() != c:
            raise RuntimeError(f"group_norm: {name} has {p.numel()} elements, expected C={c}")
        p = p.detach()
        if p.dtype != x.dtype or not p.is_contiguous() or p.device != x.device:
            p = p.to(device=x.device, dtype=x.dtype).contiguous()
        keep.append(p)
        return p.data_ptr()

    g_ptr, b_ptr = param(weight, "weight"), param(bias, "bias")
    dtype = _DTYPES[x.dtype]
    ws_bytes = lib.unidiffuser_group_norm_workspace_size(n, c, h, w, num_groups, dtype, layout)
    if ws_bytes == 0:
        raise RuntimeError(f"group_norm: unsupported problem N={n} C={c} H={h} W={w} groups={num_groups} "
                           f"(C must be divisible by num_groups)")
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        rc = lib.unidiffuser_group_norm(x.data_ptr(), g_ptr, b_ptr, out.data_ptr(), n, c, h, w, num_groups,
                                        float(eps), int(bool(silu)), dtype, layout, ws.data_ptr(), ws_bytes,
                                        stream)
    if rc != 0:
        msg = lib.unidiffuser_group_norm_error_string().decode(errors="replace")
        raise RuntimeError(f"unidiffuser_group_norm failed (code {rc}): {msg}")
    return out
