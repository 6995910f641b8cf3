"""UniDiffuser's seven tasks, as data (thu-ml `sample_multi_v1.py`, `--mode`).

One UViT predicts the noise of both streams it reads, the image stream ([z | clip_img]: the VAE
latent and the CLIP image embedding) and the text stream (the 77 x 64 text latent), each at its
own timestep. A task is which streams the solver moves, what the others are fed, and which
timesteps they get: conditional generation feeds the condition clean (timestep 0), marginal
generation feeds pure noise (timestep N), and classifier-free guidance contrasts the
conditional prediction with an unconditional one from rows where the condition is noise.

Nothing here runs anything: pipeline.py reads these tables.
"""
from __future__ import annotations

from dataclasses import dataclass

IMG, TEXT = "img", "text"   # the UViT's streams


@dataclass(frozen=True)
class Rows:
    """One group of UViT rows in a model evaluation: what each stream is fed ("x" the solver's
    state, "given" the condition, "noise" fresh N(0, I) for every evaluation) and its timestep
    ("t" the solver's time, "0" clean, "N" pure noise)."""
    img: str
    text: str
    t_img: str
    t_text: str

    def feeds(self, stream: str) -> str:
        return self.img if stream == IMG else self.text


@dataclass(frozen=True)
class Mode:
    """One solver run: the streams it moves (in the flat state's order), the conditional rows,
    and per moved stream the rows whose output is its unconditional prediction (guidance:
    cond + scale * (cond - uncond)); no uncond rows: no guidance."""
    state: tuple[str, ...]
    cond: Rows
    uncond: tuple[tuple[str, Rows], ...] = ()

    @property
    def groups(self) -> tuple[Rows, ...]:
        """The row groups of one guided evaluation: cond first, then each distinct uncond group."""
        return (self.cond, *dict.fromkeys(rows for _, rows in self.uncond))

    @property
    def given(self) -> tuple[str, ...]:
        """The streams this mode is conditioned on."""
        return tuple(s for s in (IMG, TEXT) if any(g.feeds(s) == "given" for g in self.groups))


MODES: dict[str, Mode] = {
    # text -> image: the image stream at time t, the prompt clean; uncond: text noise at N
    "t2i": Mode((IMG,), Rows("x", "given", "t", "0"), ((IMG, Rows("x", "noise", "t", "N")),)),
    # image -> text: the text stream at time t, the image clean; uncond: image noise at N
    "i2t": Mode((TEXT,), Rows("given", "x", "0", "t"), ((TEXT, Rows("noise", "x", "N", "t")),)),
    # both at time t; each stream's uncond prediction comes from rows where the other is noise
    "joint": Mode((IMG, TEXT), Rows("x", "x", "t", "t"),
                  ((IMG, Rows("x", "noise", "t", "N")), (TEXT, Rows("noise", "x", "N", "t")))),
    # one stream's marginal: the other is noise at N; no guidance
    "i": Mode((IMG,), Rows("x", "noise", "t", "N")),
    "t": Mode((TEXT,), Rows("noise", "x", "N", "t")),
}


@dataclass(frozen=True)
class Task:
    input: str | None               # "prompt", "image" or None
    modes: tuple[str, ...]          # solver runs in order; each one's state is the next one's condition
    outputs: tuple[str, ...]        # "image" and/or "text"
    about: str

    @property
    def networks(self) -> tuple[str, ...]:
        """The networks this task runs (networks.py names)."""
        encoders = {"prompt": ("text_encoder",), "image": ("vae_encoder", "image_encoder"), None: ()}[self.input]
        decoders = {"image": "vae_decoder", "text": "caption_decoder"}
        return (*encoders, "uvit", *(decoders[o] for o in self.outputs))


TASKS: dict[str, Task] = {
    "t2i": Task("prompt", ("t2i",), ("image",), "text to image"),
    "i2t": Task("image", ("i2t",), ("text",), "image to text (a caption)"),
    "joint": Task(None, ("joint",), ("image", "text"), "an image and its caption together"),
    "i": Task(None, ("i",), ("image",), "an image, unconditionally"),
    "t": Task(None, ("t",), ("text",), "a text, unconditionally"),
    "i2t2i": Task("image", ("i2t", "t2i"), ("image",), "image variation: image -> text latent -> image"),
    "t2i2t": Task("prompt", ("t2i", "i2t"), ("text",), "text variation: text -> image latents -> text"),
}


def check_backend(task: str, backend: str) -> None:
    """The TensorRT-LLM engines cover text-to-image only."""
    from .limits import InputError
    if backend == "trtllm" and task != "t2i":
        raise InputError("backend", "{backend} trtllm runs text-to-image only (the engines cover t2i); "
                         "{task} {0} needs {backend} torch", task)
