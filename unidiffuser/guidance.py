"""One model evaluation of a task's solver run (tasks.Mode): the UViT rows of every group run as
one batch, and classifier-free guidance combines them into the noise prediction of the state.

The state x is flat, [B, sum of the moved streams' sizes] in the mode's stream order (image:
z then clip_img; text), and stays fp32 (as under the original's autocast); the network runs in
the backend's dtype. In a CFG pair of GPUs (parallel.CfgPair, two row groups) each rank runs one
group and the pair exchanges the outputs, so both hold every row and take the same solver step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import sampler
from .tasks import IMG, TEXT, Mode

DATA_TYPE = 1   # v1's data-type flag: 1 = the cleaner internal data it was finetuned on


@dataclass(frozen=True)
class Shapes:
    """Per-sample shapes of the streams: img = (z, clip_img), text = (text,)."""
    z: tuple[int, ...]
    clip_img: tuple[int, ...]
    text: tuple[int, ...]

    def of(self, stream: str) -> tuple[tuple[int, ...], ...]:
        return (self.z, self.clip_img) if stream == IMG else (self.text,)

    def size(self, stream: str) -> int:
        return sum(math.prod(s) for s in self.of(stream))


def split(x: torch.Tensor, streams, shapes: Shapes) -> dict[str, tuple[torch.Tensor, ...]]:
    """The flat state as {stream: its tensors}."""
    out, i, B = {}, 0, x.shape[0]
    for s in streams:
        parts = []
        for shape in shapes.of(s):
            n = math.prod(shape)
            parts.append(x[:, i:i + n].reshape(B, *shape))
            i += n
        out[s] = tuple(parts)
    return out


def flat(parts) -> torch.Tensor:
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def noise_inputs(mode: Mode) -> list[tuple[int, str]]:
    """(group index, stream) of every input fed fresh noise at each evaluation, in draw order."""
    return [(g, s) for g, rows in enumerate(mode.groups) for s in (IMG, TEXT) if rows.feeds(s) == "noise"]


def guided(backend, mode: Mode, batch: int, shapes: Shapes, scale: float, pair=None) -> Callable:
    """fn(x, given, noise, t) -> the guided noise prediction of x, flat like x. given: {stream:
    tensors} of the condition; noise: {(group, stream): tensors} for this evaluation; t: [B]
    solver time x N. With scale 0 only the conditional rows run (the original's shortcut)."""
    groups = mode.groups if scale != 0 else mode.groups[:1]
    local = [pair.half] if pair is not None and len(groups) == 2 else list(range(len(groups)))
    if len(local) == len(groups):
        pair = None
    B, dev, dt, N = batch, backend.device, backend.dtype, sampler.NUM_TRAIN_TIMESTEPS
    fixed = {"0": torch.zeros(B, device=dev), "N": torch.full((B,), float(N), device=dev)}
    data_type = torch.full((len(local) * B,), DATA_TYPE, device=dev, dtype=torch.long)
    uncond = {s: groups.index(rows) for s, rows in mode.uncond} if len(groups) > 1 else {}

    def fn(x, given, noise, t):
        state = split(x, mode.state, shapes)
        rows = {IMG: [], TEXT: []}
        for g in local:
            for s in (IMG, TEXT):
                source = groups[g].feeds(s)
                rows[s].append(state[s] if source == "x" else given[s] if source == "given" else noise[(g, s)])
        z, clip_img = (torch.cat([r[i] for r in rows[IMG]]).to(dt) for i in range(2))
        text = torch.cat([r[0] for r in rows[TEXT]]).to(dt)
        t_img = torch.cat([t if groups[g].t_img == "t" else fixed[groups[g].t_img] for g in local])
        t_text = torch.cat([t if groups[g].t_text == "t" else fixed[groups[g].t_text] for g in local])
        z_out, clip_out, text_out = backend.uvit(z, clip_img, text, t_img, t_text, data_type)
        outs = {IMG: (z_out, clip_out), TEXT: (text_out,)}
        out = torch.cat([flat(outs[s]) for s in mode.state], dim=1)
        if pair is not None:   # all groups, cond then uncond, on both ranks of the pair
            out = pair.gather(out)
        out = out.float().split(B)
        if not uncond:
            return out[0]
        cond, widths = out[0], [shapes.size(s) for s in mode.state]
        parts = [out[uncond[s]].split(widths, 1)[i] for i, s in enumerate(mode.state)]
        unc = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return cond + scale * (cond - unc)

    return fn
