#!/usr/bin/env python3
"""Benchmark and accuracy report: the fp32 reference, our fp16 fast path (and its fp8 variant)
and diffusers' UniDiffuserPipeline (fp16, eager and torch.compile'd, when diffusers is
installed), measured in one run on one GPU.

The end-to-end peers and our own paths are also each measured in a fresh subprocess of their
own ("isolated"), one after another on the same GPU: only that pipeline's weights are resident,
no state left by another path (models, allocator cache, compiled code), so the peak memory is
that path's alone and the peers run as they would standalone.

Real v1 shapes with random weights (no downloads). Per component (text encoder + prefix, one
CFG-batched UViT call, VAE decoder) and end to end (50 steps, 512x512) at several batch sizes;
CUDA-event timings after warm-up, medians over repeats; peak GPU memory; fp16-vs-fp32 error per
component and for the final image from the same seed and initial noise. --tasks measures only the
seven tasks (t2i, i2t, joint, i, t, i2t2i, t2i2t) end to end, input file -> outputs on disk, ours
(the Python API, with its stage split) against diffusers in the same mode, each (path, task) in
a fresh process: every task at the first batch size, i2t and joint at each. On the CPU it is a smoke
test of the code paths (times mean nothing): what needs CUDA is skipped, and the run says so.
The code is unidiffuser/bench/ (its __init__ says which module measures what).

    python bench.py --json bench.json --chart bench.png            # on a CUDA GPU
    python bench.py --batch-sizes 1 8 --fp8 --profile --compile --json bench.json   # fewer batch sizes: shorter
    python bench.py --preset tiny --device cpu --batch-sizes 1 --repeats 1 --steps 3   # smoke test
    python bench.py --tasks --json tasks.json      # every task: ours against diffusers, each in its own process
    python bench.py --tasks --preset tiny --device cpu --batch-sizes 1 --repeats 1 --steps 2   # its smoke test
    torchrun --nproc-per-node 2 bench.py --cfg-parallel --batch-sizes 1 --json cfg.json  # 1 vs 2 GPUs
"""
from __future__ import annotations

from unidiffuser import cli
from unidiffuser.bench.args import parse_args


def main(argv=None) -> int:
    args = parse_args(argv, __doc__)   # checked here, before torch (seconds to import) is loaded
    if args.from_json is not None:     # measures nothing, imports no torch
        from unidiffuser.bench.report import reprint
        return reprint(args.from_json, args.chart)
    from unidiffuser.bench.main import run
    return run(args)


if __name__ == "__main__":
    cli.run(main)
