"""UniDiffuser inference, every task (text to image, image to text, joint, unconditional, the two
variations): the pipeline, its backends, the model folder, the commands' code, the server.

`from unidiffuser import UniDiffuser` is the Python API (unidiffuser/api.py); it is imported on
first use, so that importing a submodule (or a command's --help) does not load torch.
"""


def __getattr__(name):
    if name in ("UniDiffuser", "Generation"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'unidiffuser' has no attribute {name!r}")


__all__ = ["UniDiffuser", "Generation"]
