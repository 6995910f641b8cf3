"""How the networks run. A backend is built from the model folder and offers encode_text(ids),
uvit(z, clip_img, text, t_img, t_text, data_type) and decode(z); everything around the networks
(tokenizer, noise, solver, guidance) is the pipeline's, shared by all backends.

    torch    the PyTorch modules of models/ (torch_backend.py), the fast path on CUDA
    trtllm   TensorRT-LLM engines built by build_*.py (trtllm.py; imports tensorrt_llm on use)

engine_folder.py is the contract between build_*.py and the trtllm backend (no TensorRT needed).
"""
from __future__ import annotations

NAMES = ("torch", "trtllm")


def load(name: str, *args, **kwargs):
    """The backend `name`, loaded (its module is imported only when asked for)."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend.load(*args, **kwargs)
    if name == "trtllm":
        from .trtllm import TrtllmBackend
        return TrtllmBackend(*args, **kwargs)
    raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {name!r}")
