"""How a model folder is run, resolved once: device, precision, backend, compile, engine folder.

`resolve` is the one place where these are defaulted and where every rule between them is
checked (the API's load, run.py and the server all come through it), before any weights are
read. The rules that need no torch run first, so a command refuses a bad combination in its
first second; the device rules import torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import backends
from .limits import InputError, InputTypeError

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")   # fp8: the UViT blocks' linears in e4m3, the rest fp16
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Options:
    device: str                  # "cpu", "cuda" or "cuda:N", checked against this machine
    precision: str               # what the sidecars call it: one of PRECISIONS
    backend: str = "torch"
    compile: bool = False
    engine_dir: Path | None = None

    @property
    def dtype(self) -> str:
        """The networks' dtype (fp8 loads fp16 networks and quantises the UViT's linears)."""
        return "fp16" if self.precision == "fp8" else self.precision

    @property
    def quant(self) -> str | None:
        return "fp8" if self.precision == "fp8" else None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def backend_options(self) -> dict:
        if self.backend == "trtllm":
            return {"engine_dir": self.engine_dir}
        return {"compile": self.compile, "quant": self.quant}


def check_syntax(device=None, dtype=None, backend="torch", compile=False, engine_dir=None) -> None:
    """The rules that need neither torch nor this machine's devices."""
    if device is not None and not (isinstance(device, str) and DEVICE.fullmatch(device)):
        raise InputError("device", "{device} must be cpu, cuda or cuda:N, got {0!r}", device)
    if dtype is not None and dtype not in PRECISIONS:
        raise InputError("dtype", "{dtype} must be one of %s, got {0!r}" % ", ".join(PRECISIONS), dtype)
    if backend not in backends.NAMES:
        raise InputError("backend", "{backend} must be one of %s, got {0!r}" % ", ".join(backends.NAMES), backend)
    if not isinstance(compile, bool):
        raise InputTypeError("compile", "{compile} must be true or false, got {0!r}", compile)
    if compile and backend != "torch":
        raise InputError("compile", "{compile} is an option of {backend} torch (TensorRT-LLM engines are "
                         "compiled by build_*.py)")
    if dtype == "fp8" and (backend != "torch" or device == "cpu"):
        raise InputError("dtype", "{dtype} fp8 needs {backend} torch on a CUDA GPU (Hopper or newer)")
    if compile and device == "cpu":
        raise InputError("compile", "{compile} needs {device} cuda (it compiles the CUDA fast path)")
    if engine_dir is not None and backend != "trtllm":
        raise InputError("engine_dir", "{engine_dir} is an option of {backend} trtllm")


def resolve(device=None, dtype=None, backend="torch", compile=False, engine_dir=None) -> Options:
    """Options from what the caller asked (None: the default), or InputError naming the parameter."""
    if type(device).__name__ == "device":   # a torch.device
        device = str(device)
    check_syntax(device, dtype, backend, compile, engine_dir)
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and compile:
            raise InputError("compile", "{compile} needs a CUDA GPU, and none is available here (the default "
                             "{device} is cpu)")
        if device == "cpu" and dtype == "fp8":
            raise InputError("dtype", "{dtype} fp8 needs a CUDA GPU, and none is available here (the default "
                             "{device} is cpu)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("device", "{device} {0}: no CUDA device is available here (use {device} cpu)", device)
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise InputError("device", "{device} {0}: this machine has {1} CUDA device(s), cuda:0..cuda:{2}",
                             device, count, count - 1)
        if dtype == "fp8" and torch.cuda.get_device_capability(index) < (9, 0):   # models/fp8.py: rowwise e4m3
            raise InputError("dtype", "{dtype} fp8 needs a GPU with fp8 matrix units (Hopper or newer); {0} has "
                             "none: use fp16", torch.cuda.get_device_name(index))
    precision = dtype or ("fp16" if device.startswith("cuda") else "fp32")
    return Options(device, precision, backend, compile, None if engine_dir is None else Path(engine_dir))
