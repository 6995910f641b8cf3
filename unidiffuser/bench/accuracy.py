"""The fast path's error against the fp32 reference: per component and for the final image
from the same seed and initial noise."""
from __future__ import annotations

import torch

from ..pipeline import Pipeline, Request, on_device
from ..tasks import IMG


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Absolute and relative error of out against ref. Elementwise relative error is taken
    where |ref| > 1e-3 * max|ref| (near-zero references make it meaningless)."""
    out, ref = out.double().flatten(), ref.double().flatten()
    d = (out - ref).abs()
    keep = ref.abs() > 1e-3 * ref.abs().max()
    rel = d[keep] / ref.abs()[keep]

    def stats(t):
        return {"max": t.max().item(), "mean": t.mean().item(), "median": t.median().item()}

    return {"abs": stats(d), "rel": stats(rel), "rel_l2": (d.norm() / ref.norm()).item(),
            "ref_rms": ref.pow(2).mean().sqrt().item()}


def to_levels(img):
    return ((img + 1) * 0.5).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.int16)


def level_errors(img: torch.Tensor, ref: torch.Tensor) -> dict:
    """How far apart two [-1, 1] images are once written as uint8 levels."""
    d = (to_levels(img) - to_levels(ref)).abs()
    return {"max": d.max().item(), "mean": d.float().mean().item()}


@torch.no_grad()
def final_image(pipe: Pipeline, req: Request) -> torch.Tensor:
    """The final image in [-1, 1] (before uint8), fp32 on the CPU: the pipeline's own latents,
    decoded. tests/test_bench.py checks this is the image pipe(req) writes."""
    with on_device(pipe.device):
        state, _ = pipe.latents(req)
        return pipe.backend.decode(state[IMG][0].to(pipe.dtype)).float().cpu()


def image_accuracy(pipes: dict, args) -> dict:
    """The final image of the fast path (and of fp8) against fp32's, from one seed."""
    req = Request(["a red cube on a blue sphere"], [42], args.steps, 7.0, args.size, args.size)
    img_ref = final_image(pipes["fp32"], req)
    img_fast = final_image(pipes[args.dtype], req)
    acc = {"image_[-1,1]": errors(img_fast, img_ref), "image_uint8_levels": level_errors(img_fast, img_ref)}
    if pipes.get("fp8") is not None:
        img_8 = final_image(pipes["fp8"], req)
        acc["image_fp8_[-1,1]"] = errors(img_8, img_ref)
        acc["image_fp8_uint8_levels"] = level_errors(img_8, img_ref)
    return acc


def component_accuracy(outs: dict, dtype_tag: str) -> dict:
    """Each network's output on the fast path (and fp8's UViT) against fp32's, from components()."""
    acc = {name: errors(outs[dtype_tag][name], outs["fp32"][name]) for name in ("text_encoder", "uvit", "decoder")}
    if "fp8" in outs:
        acc["uvit_fp8"] = errors(outs["fp8"]["uvit"], outs["fp32"]["uvit"])
    return acc
