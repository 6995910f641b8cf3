"""Which of the UViT's linears can run in fp8 without moving the picture (issue: fp8 that keeps
the picture). At the v1 shapes with random weights, t2i 512x512, 50 steps, scale 7, on a CUDA GPU:

1. ranking: each group alone in fp8 (every other linear fp16) -- each of the 31 blocks, and each
   kind of linear (qkv, proj, fc1, fc2, skip_linear) over all blocks -- and its final image's mean
   |levels| against fp32, over --rank-seeds seeds;
2. candidates: all linears in fp8 but the k most sensitive blocks (k in --keep-blocks), and their
   error against fp32 and fp16 over --seeds seeds, and their end-to-end time at B=1 and B=8.

Prints the tables and writes --json. models/fp8.py's FP16_LAYERS is chosen from it.

    python docs/fp8_sensitivity.py --json docs/fp8-sensitivity-h200.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import fp8  # noqa: E402
from models.config import PRESETS  # noqa: E402
from models.uvit import Block  # noqa: E402
from unidiffuser import networks  # noqa: E402
from unidiffuser.backends.torch_backend import TorchBackend  # noqa: E402
from unidiffuser.pipeline import Pipeline, Request  # noqa: E402
from unidiffuser.tokenizer import Tokenizer, write_tokenizer_files  # noqa: E402
from unidiffuser.weights.random_weights import randomize_  # noqa: E402

PROMPT = "a red cube on a blue sphere"
T2I = ("text_encoder", "uvit", "vae_decoder")
KINDS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "skip_linear")


def linears(uvit) -> dict[str, list[str]]:
    """Block name -> the names of its linears that fp8 may replace."""
    return {n: [f"{n}.{k}" for k in KINDS if k != "skip_linear" or b.skip_linear is not None]
            for n, b in uvit.named_modules() if isinstance(b, Block)}


class Bench:
    def __init__(self, tmp: Path, preset: str, device: str):
        self.cfg, self.device = PRESETS[preset], torch.device(device)
        write_tokenizer_files(tmp / "clip")
        self.tok = Tokenizer(tmp / "clip")
        g = torch.Generator(device=self.device).manual_seed(0)
        self.ref = {n: randomize_(networks.build(n, self.cfg, self.device), g).eval().requires_grad_(False) for n in T2I}
        self.fp32 = self.pipeline(torch.float32)
        self.fp16 = self.pipeline(torch.float16)
        self.names = linears(self.fp16.backend.uvit_net)
        self.side = self.cfg.default_size
        self.want: dict[str, dict[int, torch.Tensor]] = {"fp32": {}, "fp16": {}}

    def pipeline(self, dtype, keep=None) -> Pipeline:
        nets = {n: networks.build(n, self.cfg, self.device) for n in T2I}
        for n in T2I:
            nets[n].load_state_dict(self.ref[n].state_dict())
        backend = TorchBackend(nets, self.device, dtype)
        if keep is not None:
            fp8.convert_uvit(backend.uvit_net, keep)
        return Pipeline(backend, self.cfg, self.tok)

    def images(self, p: Pipeline, seeds: list[int]) -> torch.Tensor:
        out = []
        for i in range(0, len(seeds), 8):
            s = seeds[i:i + 8]
            out.append(p(Request([PROMPT] * len(s), s, height=self.side, width=self.side)).images.int())
        return torch.cat(out)

    def error(self, p: Pipeline, seeds: list[int]) -> dict:
        for ref in ("fp32", "fp16"):
            missing = [s for s in seeds if s not in self.want[ref]]
            if missing:
                self.want[ref].update(zip(missing, self.images(getattr(self, ref), missing)))
        got = self.images(p, seeds)
        res = {}
        for ref in ("fp32", "fp16"):
            d = (got - torch.stack([self.want[ref][s] for s in seeds])).abs().float().flatten(1)
            res[f"vs_{ref}_mean"] = d.mean(1).tolist()
            res[f"vs_{ref}_max"] = d.amax(1).tolist()
        return res

    def fp8_keeping(self, in_fp8: list[str]) -> list[str]:
        """The keep list that leaves exactly in_fp8 in fp8."""
        return [n for names in self.names.values() for n in names if n not in set(in_fp8)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(p: Pipeline, B: int, repeats: int, side: int) -> float:
    req = Request([PROMPT] * B, list(range(B)), height=side, width=side)
    p(req)                                  # captures the graphs for B
    ts = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        p(req)
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank-seeds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--keep-blocks", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--preset", default="v1", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/fp8-sensitivity"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    b = Bench(args.tmp, args.preset, args.device)
    report = {"device": torch.cuda.get_device_name() if b.device.type == "cuda" else "cpu", "torch": torch.__version__, "prompt": PROMPT,
              "ranking": {}, "candidates": {}}
    rank_seeds = list(range(5, 5 + args.rank_seeds))
    groups = {blk: names for blk, names in b.names.items()}
    groups.update({kind: [n for names in b.names.values() for n in names if n.endswith(kind)] for kind in KINDS})
    with torch.no_grad():
        for g, in_fp8 in groups.items():
            e = b.error(b.pipeline(torch.float16, b.fp8_keeping(in_fp8)), rank_seeds)
            report["ranking"][g] = e
            print(f"only {g:<14} in fp8: vs fp32 mean {statistics.mean(e['vs_fp32_mean']):.3f} levels", flush=True)
        blocks = sorted(b.names, key=lambda n: -statistics.mean(report["ranking"][n]["vs_fp32_mean"]))
        seeds = list(range(5, 5 + args.seeds))
        for k in args.keep_blocks:
            keep = blocks[:k]
            p = b.pipeline(torch.float16, keep)
            e = b.error(p, seeds)
            e.update(keep=keep, b1_s=seconds(p, 1, 5, b.side), b8_s=seconds(p, 8, 3, b.side))
            report["candidates"][k] = e
            print(f"fp16 for the {k} most sensitive blocks {keep}: vs fp32 mean "
                  f"{statistics.mean(e['vs_fp32_mean']):.2f} (max per seed {max(e['vs_fp32_mean']):.2f}), "
                  f"vs fp16 mean {statistics.mean(e['vs_fp16_mean']):.2f}; B=1 {e['b1_s'] * 1000:.0f} ms, "
                  f"B=8 {8 / e['b8_s']:.2f} img/s", flush=True)
            del p
        p = b.fp16
        report["fp16"] = {**b.error(p, seeds), "b1_s": seconds(p, 1, 5, b.side), "b8_s": seconds(p, 8, 3, b.side)}
        print(f"fp16: vs fp32 mean {statistics.mean(report['fp16']['vs_fp32_mean']):.2f}; "
              f"B=1 {report['fp16']['b1_s'] * 1000:.0f} ms, B=8 {8 / report['fp16']['b8_s']:.2f} img/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
