"""UniDiffuser text-to-image: tokenizer, sampler, checkpoint conversion and the pipeline.

`from unidiffuser import UniDiffuser` is the Python API (unidiffuser/api.py); it is imported on
first use, so that importing a submodule (or a command's --help) does not load torch.
"""


def __getattr__(name):
    if name in ("UniDiffuser", "Generation"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'unidiffuser' has no attribute {name!r}")


__all__ = ["UniDiffuser", "Generation"]
