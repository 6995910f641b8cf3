"""Benchmark + precision check of the fused GroupNorm(+SiLU) kernel against torch (one run).

  python3 plugin/bench_groupnorm.py [--json out.json] [--lib path/to/libunidiffuser_plugins.so]

Speed: fp16, 32 groups, eps 1e-6, SiLU, at the VAE decoder's shapes. Each variant is captured in a
CUDA graph over R rotating inputs (R*size >= ~200 MB, so L2 holds no input between calls, and no
launch gaps are timed); time = median over replays / R. GB/s counts bytes read + written:
  "2-pass" = read x once + write y once (the minimum any implementation needs);
  "3-pass" = our kernel's actual traffic: it reads x twice (stats, then normalize), although the
             second read partly hits L2 (the apply pass walks tiles in reverse order).
Device copy bandwidth = a 1 GiB device-to-device copy, read+write bytes, measured in the same run.

Precision: fp16 outputs vs a float64 reference on large-magnitude, non-zero-mean data, for our
kernel, torch's fp16 group_norm (which upcasts internally), and an fp16-accumulating group norm
(statistics accumulated in half: 64-element sequential half sums, then a half pairwise tree).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(1, 128, 512, 512), (1, 256, 512, 512), (1, 256, 256, 256), (1, 512, 128, 128), (1, 512, 64, 64)]
G, EPS = 32, 1e-6


def graph_time_ms(fn, xs, reps=20):
    """Median time of one fn(x) call, from replays of a graph holding fn over all of xs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (module load, allocator pools)
        for x in xs:
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in xs:
            fn(x)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(xs))
    del graph
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda s: dst.copy_(s), [src], reps=20)
    return 2 * n / ms / 1e6        # src and dst are freed on return


def make_input(shape, dtype, mean=300.0, std=50.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n, c, h, w = shape
    offs = mean + 0.5 * std * torch.randn(1, c, 1, 1, device="cuda", generator=g)
    return (offs + std * torch.randn(n, c, h, w, device="cuda", generator=g)).to(dtype)


def fp16_accum_mean(t):
    """Mean over the last dim accumulated in half, like a kernel with half accumulators."""
    chunks = t.unflatten(-1, (-1, 64))
    acc = torch.zeros_like(chunks[..., 0])
    for i in range(64):
        acc = acc + chunks[..., i]  # half + half -> half
    m = acc / 64
    while m.shape[-1] > 1:  # pairwise means (pad odd lengths by repeating the last chunk mean)
        if m.shape[-1] % 2:
            m = torch.cat([m, m[..., -1:]], -1)
        m = (m[..., 0::2] + m[..., 1::2]) * 0.5
    return m


def fp16_accum_group_norm(x, w, b, silu):
    n, c = x.shape[:2]
    xg = x.reshape(n, G, -1)
    mean = fp16_accum_mean(xg)
    var = fp16_accum_mean((xg - mean) * (xg - mean))
    y = ((xg - mean) / torch.sqrt(var + EPS)).reshape(x.shape) * w.view(1, c, 1, 1) + b.view(1, c, 1, 1)
    return F.silu(y) if silu else y


def errors(y, ref):
    d = y.double() - ref
    rel = (d.norm() / ref.norm()).item()
    return {"rel_l2": rel if math.isfinite(rel) else float("nan"), "max_abs": d.abs().max().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--lib", help="library path (default: plugin/build/libunidiffuser_plugins.so)")
    args = ap.parse_args()
    if args.lib:
        os.environ["UNIDIFFUSER_PLUGIN_LIB"] = args.lib
    from models import groupnorm

    if not groupnorm.available():
        sys.exit(f"plugin library not available ({groupnorm.library_path()}); build: {groupnorm.BUILD_CMD}")
    dev = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs; torch {torch.__version__}; "
          f"device copy bandwidth (read+write) {copy_gbs:.0f} GB/s", flush=True)

    rows = []
    for shape in SHAPES:
        n, c, h, w = shape
        nbytes = n * c * h * w * 2
        rot = max(2, min(32, math.ceil(200e6 / nbytes)))
        wgt = (1 + 0.2 * torch.randn(c, device="cuda")).half()
        bias = (0.2 * torch.randn(c, device="cuda")).half()
        xs = [make_input(shape, torch.float16, seed=i) for i in range(rot)]
        xs_cl = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        ours = lambda x: groupnorm.group_norm(x, wgt, bias, G, EPS, True)
        ref = lambda x: F.silu(F.group_norm(x, G, wgt, bias, EPS))
        t = {
            "ours_nhwc": graph_time_ms(ours, xs_cl),
            "ours_nchw": graph_time_ms(ours, xs),
            "torch_nchw": graph_time_ms(ref, xs),
            "torch_cl": graph_time_ms(ref, xs_cl),
        }
        r = {"shape": list(shape), "bytes_2pass": 2 * nbytes, "ms": t,
             "gbs_2pass": {k: 2 * nbytes / v / 1e6 for k, v in t.items()},
             "gbs_3pass_ours": {k: 3 * nbytes / t[k] / 1e6 for k in ("ours_nhwc", "ours_nchw")},
             "speedup_nhwc_vs_torch_cl": t["torch_cl"] / t["ours_nhwc"],
             "speedup_nhwc_vs_torch_nchw": t["torch_nchw"] / t["ours_nhwc"],
             "speedup_nchw_vs_torch_nchw": t["torch_nchw"] / t["ours_nchw"]}
        rows.append(r)
        print(f"{shape}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in t.items()), flush=True)
        del xs, xs_cl

    # ---- precision ----
    prec = []
    for label, mean, std in (("mean300_std50", 300.0, 50.0), ("mean1e3_std1", 1000.0, 1.0)):
        shape = (1, 256, 256, 256)
        x = make_input(shape, torch.float16, mean, std, seed=99)
        wgt = (1 + 0.2 * torch.randn(shape[1], device="cuda")).half()
        bias = (0.2 * torch.randn(shape[1], device="cuda")).half()
        refv = F.silu(F.group_norm(x.double(), G, wgt.double(), bias.double(), EPS))
        res = {
            "ours_fp16_nhwc": errors(groupnorm.group_norm(x.contiguous(memory_format=torch.channels_last),
                                                          wgt, bias, G, EPS, True), refv),
            "ours_fp16_nchw": errors(groupnorm.group_norm(x, wgt, bias, G, EPS, True), refv),
            "torch_fp16": errors(F.silu(F.group_norm(x, G, wgt, bias, EPS)), refv),
            "fp16_accum": errors(fp16_accum_group_norm(x, wgt, bias, True), refv),
            "ours_fp32": errors(groupnorm.group_norm(x.float(), wgt.float(), bias.float(), G, EPS, True), refv),
        }
        prec.append({"data": label, "shape": list(shape), "errors": res})

    # ---- table ----
    print(f"\n=== fused GroupNorm+SiLU, fp16, {dev.name}; copy BW {copy_gbs:.0f} GB/s (read+write) ===")
    print(f"{'shape':>20} | {'ours NHWC':>10} {'ours NCHW':>10} {'torch NCHW':>10} {'torch CL':>10} us | "
          f"{'NHWC GB/s 2p/3p':>16} {'%copy 2p/3p':>12} | {'x vs torch CL':>13} {'x vs NCHW':>9}")
    for r in rows:
        t, g2, g3 = r["ms"], r["gbs_2pass"], r["gbs_3pass_ours"]
        print(f"{'x'.join(map(str, r['shape'])):>20} | {t['ours_nhwc'] * 1e3:10.1f} {t['ours_nchw'] * 1e3:10.1f} "
              f"{t['torch_nchw'] * 1e3:10.1f} {t['torch_cl'] * 1e3:10.1f}    | "
              f"{g2['ours_nhwc']:7.0f}/{g3['ours_nhwc']:<7.0f}  "
              f"{100 * g2['ours_nhwc'] / copy_gbs:5.0f}/{100 * g3['ours_nhwc'] / copy_gbs:<5.0f}  | "
              f"{r['speedup_nhwc_vs_torch_cl']:12.2f}x {r['speedup_nhwc_vs_torch_nchw']:8.2f}x")
    print("(2p: read x + write y; 3p: plus our second read of x. torch GB/s (2p): " + ", ".join(
        f"{'x'.join(map(str, r['shape']))} NCHW {r['gbs_2pass']['torch_nchw']:.0f} CL {r['gbs_2pass']['torch_cl']:.0f}"
        for r in rows) + ")")
    print("\n=== precision vs float64 reference (1x256x256x256, GroupNorm+SiLU) ===")
    print(f"{'data':>14} | " + " | ".join(f"{k:>22}" for k in prec[0]["errors"]))
    for p in prec:
        print(f"{p['data']:>14} | " + " | ".join(
            f"rel {e['rel_l2']:.1e} max {e['max_abs']:.1e}" for e in p["errors"].values()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": dev.name, "sms": dev.multi_processor_count, "torch": torch.__version__,
            "copy_gbs": copy_gbs, "speed": rows, "precision": prec}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
