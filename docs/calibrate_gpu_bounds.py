"""How the fast paths' error against fp32 is distributed over seeds, at the v1 shapes with random
weights: the figures the GPU tests' bounds are derived from (tests/test_fast_path.py,
tests/test_tasks_gpu.py). Per sample: mean |levels| of the final image, or the relative L2 of the
final text latent; printed per seed and as mean / std / max.

    python docs/calibrate_gpu_bounds.py --seeds 16      # on a CUDA GPU
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import PRESETS  # noqa: E402
from unidiffuser import networks  # noqa: E402
from unidiffuser.backends.torch_backend import TorchBackend  # noqa: E402
from unidiffuser.caption_tokenizer import CaptionTokenizer, write_random_files  # noqa: E402
from unidiffuser.guidance import split  # noqa: E402
from unidiffuser.pipeline import Pipeline, Request  # noqa: E402
from unidiffuser.tasks import MODES, TASKS, TEXT  # noqa: E402
from unidiffuser.tokenizer import Tokenizer, write_tokenizer_files  # noqa: E402
from unidiffuser.weights.random_weights import randomize_  # noqa: E402

CFG = PRESETS["v1"]


def pipelines(tmp: Path):
    write_tokenizer_files(tmp / "clip")
    write_random_files(tmp / "gpt2")
    g = torch.Generator(device="cuda").manual_seed(0)
    ref = {n: randomize_(networks.build(n, CFG, "cuda"), g).eval().requires_grad_(False) for n in networks.ALL}
    out = {}
    for name, dtype, quant in (("fp32", torch.float32, None), ("fp16", torch.float16, None), ("fp8", torch.float16, "fp8")):
        nets = {n: networks.build(n, CFG, "cuda") for n in ref}
        for n in ref:
            nets[n].load_state_dict(ref[n].state_dict())
        p = Pipeline(TorchBackend(nets, torch.device("cuda"), dtype, quant=quant), CFG, Tokenizer(tmp / "clip"))
        p._captions = CaptionTokenizer(tmp / "gpt2")
        out[name] = p
    return out


def final_states(p, req):
    got = {}
    sample = p.sample
    p.sample = lambda name, *a, **k: got.setdefault(name, sample(name, *a, **k))
    result = p(req)
    del p.sample
    return result, got[TASKS[req.task].modes[-1]]


def report(label, values):
    print(f"{label}: mean {statistics.mean(values):.3f} std {statistics.pstdev(values):.3f} "
          f"max {max(values):.3f} over {len(values)} samples; per seed {[round(v, 3) for v in values]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/calibrate"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pipes = pipelines(args.tmp)
    seeds = list(range(5, 5 + args.seeds))
    from PIL import Image
    import numpy as np
    photo = Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
    cases = [("t2i", "fp8", 10, 256), ("t2i", "fp16", 10, 256), ("joint", "fp16", 8, 512), ("t2i2t", "fp16", 8, 512),
             ("i2t", "fp16", 8, 512), ("i2t2i", "fp16", 8, 512)]
    with torch.no_grad():
        for task, fast, steps, side in cases:
            need = TASKS[task].input
            per_img, per_text = [], []
            for chunk in range(0, len(seeds), 8):
                s = seeds[chunk:chunk + 8]
                req = Request(["a red cube on a blue sphere"] * len(s) if need == "prompt" else [], s, steps, 7.0,
                              side, side, task, [photo.resize((side, side))] * len(s) if need == "image" else None)
                want, xw = final_states(pipes["fp32"], req)
                got, xg = final_states(pipes[fast], req)
                if want.images is not None:
                    d = (got.images.int() - want.images.int()).abs().float()
                    per_img += d.flatten(1).mean(1).tolist()
                if want.texts is not None:
                    shapes = pipes["fp32"].shapes(side // 8, side // 8)
                    tw = split(xw, MODES[TASKS[task].modes[-1]].state, shapes)[TEXT][0]
                    tg = split(xg, MODES[TASKS[task].modes[-1]].state, shapes)[TEXT][0]
                    per_text += ((tg - tw).flatten(1).norm(dim=1) / tw.flatten(1).norm(dim=1)).tolist()
            if per_img:
                report(f"{task} {fast} vs fp32, {steps} steps {side}px: image mean |levels|", per_img)
            if per_text:
                report(f"{task} {fast} vs fp32, {steps} steps {side}px: text latent rel L2", per_text)


if __name__ == "__main__":
    main()
