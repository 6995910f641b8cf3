"""CFG parallelism: one GPU against a CFG pair of two, under `torchrun --nproc-per-node 2`.

Per batch size, end to end on one GPU (rank 0 alone, rank 1 waiting) and on the CFG pair (rank 0
conditional rows, rank 1 unconditional), in one run with the same random weights; the UViT call
on 2B rows (one GPU) and on B rows (each rank of a pair); the pair's per-step all-gather alone,
eager and captured as a graph of `--steps` exchanges (the per-step cost inside the sampling).
Rank 0 prints and writes --json."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from models.config import PRESETS

from ..backends.torch_backend import TorchBackend
from ..pipeline import Pipeline
from ..weights import loading
from .nets import make_tokenizer, random_networks, request
from .report import write_json
from .timing import graphed, time_ms


@dataclass
class Pair:
    """This rank's side of the comparison: the same weights as one GPU and as its CFG pair half."""
    layout: object
    backend: TorchBackend
    one: Pipeline
    pair: Pipeline
    cfg: object
    h: int
    w: int

    @property
    def device(self):
        return self.layout.device

    @property
    def rank(self) -> int:
        return self.layout.rank


def cfg_parallel_main(args) -> int:
    import torch.distributed as dist

    from .. import parallel
    try:
        layout = parallel.init_from_env(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if layout.cfg_pair is None or layout.world_size != 2:
        print("error: --cfg-parallel runs as one CFG pair: torchrun --nproc-per-node 2 bench.py --cfg-parallel ...",
              file=sys.stderr)
        return 2
    p = setup(args, layout)
    names = [None, None]
    dist.all_gather_object(names, torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else "cpu")
    report = {"mode": "cfg_parallel", "devices": names, "torch": torch.__version__, "preset": args.preset,
              "dtype": str(p.backend.dtype).removeprefix("torch."), "size": args.size, "steps": args.steps,
              "argv": sys.argv[1:], "end_to_end": {}, "uvit_call_ms": {}, "exchange_us": {}}
    if p.rank == 0:
        print(f"# CFG parallel: {names}, torch {torch.__version__}, preset {args.preset}, "
              f"{args.size}x{args.size}, {args.steps} steps, {report['dtype']}", flush=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for B in args.batch_sizes:
            measure_batch(report, p, B, gen, args)
    if p.rank == 0 and args.json:
        write_json(args.json, report)
    layout.close()
    return 0


def setup(args, layout) -> Pair:
    device = layout.device
    dtype = loading.DTYPES[args.dtype] if device.type == "cuda" else torch.float32   # CPU: a smoke test
    cfg = PRESETS[args.preset]
    f = cfg.vae_decoder.downsample
    backend = TorchBackend(random_networks(cfg, device), device, dtype)   # the same weights on both ranks (same seed)
    tok = make_tokenizer()
    return Pair(layout, backend, Pipeline(backend, cfg, tok), Pipeline(backend, cfg, tok, cfg_pair=layout.cfg_pair),
                cfg, args.size // f, args.size // f)


def measure_batch(report: dict, p: Pair, B: int, gen: torch.Generator, args) -> None:
    import torch.distributed as dist

    req = request(B, args)
    r = report["end_to_end"][B] = {}
    img_one = None
    if p.rank == 0:                              # one GPU, as run.py without torchrun
        p.one(req)                               # capture
        r["one_gpu_ms"] = time_ms(lambda: p.one(req), p.device, warmup=0, repeats=args.repeats)
        img_one = p.one(req).images
        report["uvit_call_ms"][B] = uvit_calls(p, B, gen)
    dist.barrier()
    p.pair(req)                                  # both ranks: capture, with the exchange inside
    r["cfg_pair_ms"] = time_ms(lambda: p.pair(req), p.device, warmup=0, repeats=args.repeats)
    img_pair = p.pair(req).images
    e = report["exchange_us"][B] = exchange(p, B, gen, args.steps)
    if p.rank == 0:
        r["speed_up"] = r["one_gpu_ms"] / r["cfg_pair_ms"]
        r["image_max_level_diff"] = (img_one.int() - img_pair.int()).abs().max().item()
        print(f"B={B}: one GPU {r['one_gpu_ms']:.1f} ms, CFG pair {r['cfg_pair_ms']:.1f} ms, "
              f"{r['speed_up']:.2f}x (images differ by <= {r['image_max_level_diff']} levels); "
              f"UViT call {', '.join(f'{k} {v:.2f} ms' for k, v in report['uvit_call_ms'][B].items())}; "
              f"exchange {', '.join(f'{k} {v:.1f}' for k, v in e.items())} (us)", flush=True)


def uvit_calls(p: Pair, B: int, gen: torch.Generator) -> dict:
    """The UViT call on 2B rows (one GPU's) and on B rows (each pair rank's), graphed."""
    u, device, dtype = p.cfg.uvit, p.device, p.backend.dtype
    c = {}
    for rows in (2 * B, B):
        a = (torch.randn(rows, u.in_chans, p.h, p.w, generator=gen).to(device, dtype),
             torch.randn(rows, 1, u.clip_img_dim, generator=gen).to(device, dtype),
             torch.randn(rows, u.num_text_tokens, u.text_dim, generator=gen).to(device, dtype),
             torch.full((rows,), 500.0, device=device), torch.zeros(rows, device=device),
             torch.ones(rows, dtype=torch.long, device=device))
        c[f"{rows}_rows"] = time_ms(graphed(lambda: p.backend.uvit(*a), device), device, repeats=30)
    return c


def exchange(p: Pair, B: int, gen: torch.Generator, steps: int) -> dict:
    """The pair's all-gather of one step's outputs alone: eager, and per step in a graph of `steps`."""
    u, device, dtype, half = p.cfg.uvit, p.device, p.backend.dtype, p.layout.cfg_pair
    x = torch.randn(B, u.in_chans * p.h * p.w + u.clip_img_dim, generator=gen).to(device, dtype)
    e = {"bytes_per_rank": x.numel() * x.element_size()}
    e["eager"] = 1e3 * time_ms(lambda: half.gather(x), device, repeats=50)
    if device.type == "cuda":
        loop = graphed(lambda: [half.gather(x) for _ in range(steps)][-1], device)
        e["in_graph_per_step"] = 1e3 * time_ms(loop, device, repeats=20) / steps
    return e
