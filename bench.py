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
component and for the final image from the same seed and initial noise.

    python bench.py --json bench.json --chart bench.png            # on a CUDA GPU
    python bench.py --batch-sizes 1 8 --fp8 --profile --compile --json bench.json   # fewer batch sizes: shorter
    python bench.py --preset tiny --device cpu --batch-sizes 1 --repeats 1 --steps 3   # smoke test
    torchrun --nproc-per-node 2 bench.py --cfg-parallel --batch-sizes 1 --json cfg.json  # 1 vs 2 GPUs
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

from models.config import PRESETS

ISOLATED = ("diffusers", "diffusers-compiled", "ours-fp16", "ours-fp8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="v1")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="precision of the fast path")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="batch sizes of our paths (the diffusers peers run at the first)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per end-to-end measurement")
    p.add_argument("--fp32-e2e-batches", type=int, nargs="*", default=[1],
                   help="batch sizes at which the (slow) fp32 reference also runs end to end")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers even if installed")
    p.add_argument("--no-peer-compile", action="store_true",
                   help="skip diffusers with torch.compile on its UNet (~70 s of compiling)")
    p.add_argument("--no-isolated", action="store_true", help="skip the per-path subprocess measurements")
    p.add_argument("--diffusers-in-process", action="store_true",
                   help="also time diffusers at the first batch size inside this process (diagnosis)")
    p.add_argument("--fp8", action="store_true", help="also measure the fp8 path (models/fp8.py)")
    p.add_argument("--isolated", choices=ISOLATED, help=argparse.SUPPRESS)   # internal: one path, one process
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile'd UViT")
    p.add_argument("--profile", action="store_true", help="split one fp16 UViT call into GEMM / attention / rest")
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    p.add_argument("--from-json", type=Path, help="measure nothing: print the table of a saved --json run "
                   "(and draw its --chart)")
    p.add_argument("--cfg-parallel", action="store_true", help="under torchrun --nproc-per-node 2: end to end "
                   "on one GPU against a CFG pair of two, and the per-step exchange (see cfg_parallel_main)")
    # cold start (see cold_start below)
    p.add_argument("--cold-start", action="store_true", help="also time process start -> first PNG written, "
                   "ours (run.py) and diffusers (from_pretrained), as subprocesses")
    p.add_argument("--cold-start-only", action="store_true", help="only the cold-start measurement")
    p.add_argument("--cold-start-dir", type=Path, help="work folder of the cold start (random model folders are "
                   "written here once and reused; default: a temporary folder)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()   # --help and argument errors answer before the imports below (torch takes seconds)

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from unidiffuser import networks

from unidiffuser.weights import loading, random_weights
from unidiffuser.backends.torch_backend import TorchBackend, capture_graph
from unidiffuser.pipeline import Request, Text2Image  # noqa: E402


# -- timing -----------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup=3, repeats=20) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU, a synchronised clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(fn, device):
    """fn captured in a CUDA graph (the fast path's way of running a fixed-shape call)."""
    if device.type != "cuda":
        return fn
    return capture_graph(fn)[0].replay


def unfused(backend, z):
    """The fast decoder with torch's group_norm + silu instead of the plugin's fused kernel."""
    from models.vae_decoder import GroupNorm
    norms = [m for m in backend.vae_decoder.modules() if isinstance(m, GroupNorm)]
    saved = [m.fused for m in norms]
    for m in norms:
        m.fused = False
    try:
        return backend.vae_decoder(z.contiguous(memory_format=torch.channels_last))
    finally:
        for m, f in zip(norms, saved):
            m.fused = f


def peak_mb(device, fn) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


# -- accuracy -----------------------------------------------------------------------------------

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


# -- the networks -------------------------------------------------------------------------------

def random_networks(cfg, device) -> dict[str, torch.nn.Module]:
    """The three networks with random weights (random_weights.randomize_), fp32, drawn on the device."""
    g = torch.Generator(device).manual_seed(0)
    return {n: random_weights.randomize_(networks.build(n, cfg, device), g).eval().requires_grad_(False)
            for n in networks.NAMES}


def build_networks(cfg, device, dtype, copies=1):
    """The fp32 reference on the device and `copies` fast-path copies of the same weights."""
    ref = random_networks(cfg, device)                                      # fp32, as written
    fasts = []
    for _ in range(copies):
        fast = {k: networks.build(k, cfg, device).to(dtype=dtype).eval().requires_grad_(False) for k in ref}
        for k in ref:
            fast[k].load_state_dict(ref[k].state_dict())
        fasts.append(fast)
    return ref, *fasts


def set_uvit_fusions(uvit, on: bool) -> None:
    """Residual+LayerNorm kernel and split skip GEMMs on or off (to measure what they bring)."""
    from models.fused_norm import LayerNorm
    from models.uvit import SkipLinear
    for m in uvit.modules():
        if isinstance(m, LayerNorm):
            m.fused = on
        elif isinstance(m, SkipLinear):
            m.split = on


def make_tokenizer():
    """CLIP's tokenizer from the files it ships (read once; the folder is gone afterwards)."""
    import tempfile

    from unidiffuser import tokenizer
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        tokenizer.write_tokenizer_files(Path(tmp))
        return tokenizer.Tokenizer(Path(tmp))


# -- diffusers ----------------------------------------------------------------------------------

def clip_tokenizer(cls):
    """transformers' CLIPTokenizer (diffusers' pipeline wants one) on CLIP's BPE files."""
    import tempfile

    from unidiffuser import tokenizer
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        tokenizer.write_tokenizer_files(Path(tmp))
        return cls.from_pretrained(tmp, model_max_length=77)


def diffusers_pipeline(cfg, device, dtype):
    """diffusers' UniDiffuserPipeline at the same shapes, random weights. The image encoder and
    caption decoder are unused by text-to-image and built tiny."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UniDiffuserPipeline
    from diffusers.pipelines.deprecated.unidiffuser import UniDiffuserModel, UniDiffuserTextDecoder
    from transformers import (CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              CLIPImageProcessor)

    from models.text_encoder import clip_text_config

    u, v = cfg.uvit, cfg.vae_decoder
    unet = UniDiffuserModel(
        text_dim=u.text_dim, clip_img_dim=u.clip_img_dim, num_text_tokens=u.num_text_tokens,
        num_attention_heads=u.num_heads, attention_head_dim=u.embed_dim // u.num_heads,
        in_channels=u.in_chans, out_channels=u.in_chans, num_layers=u.depth, norm_num_groups=32,
        attention_bias=u.qkv_bias, sample_size=u.img_size, patch_size=u.patch_size, activation_fn="gelu",
        num_embeds_ada_norm=1000, block_type="unidiffuser", pre_layer_norm=False,
        use_timestep_embedding=False, use_patch_pos_embed=False, ff_final_dropout=True,
        use_data_type_embedding=True)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v.z_channels, norm_num_groups=v.num_groups,
        block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult), up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult),
        scaling_factor=v.scale_factor, sample_size=cfg.default_size)
    text_encoder = CLIPTextModel(clip_text_config(cfg.text_encoder))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, projection_dim=u.clip_img_dim))
    text_decoder = UniDiffuserTextDecoder(
        prefix_length=77, prefix_inner_dim=cfg.text_encoder.hidden_size, prefix_hidden_dim=u.text_dim,
        vocab_size=64, n_positions=128, n_embd=32, n_layer=1, n_head=2, n_inner=64)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            solver_order=3)
    pipe = UniDiffuserPipeline(vae=vae, text_encoder=text_encoder, image_encoder=image_encoder,
                               clip_image_processor=CLIPImageProcessor(), clip_tokenizer=clip_tokenizer(CLIPTokenizer),
                               text_decoder=text_decoder, text_tokenizer=None, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


# -- isolated runs: one path per fresh process -------------------------------------------------

def isolated_main(args) -> dict:
    """End to end for one path alone in this process. Peak memory counts what the path holds once
    built (its weights) and what it allocates running (activations, graph pools)."""
    device = torch.device("cuda")
    dtype = loading.DTYPES[args.dtype]
    cfg = PRESETS[args.preset]
    mode = args.isolated
    tok = make_tokenizer()
    out = {"mode": mode, "end_to_end": {}}
    t0 = time.perf_counter()
    if mode.startswith("diffusers"):
        pipe = diffusers_pipeline(cfg, device, dtype)
        if mode == "diffusers-compiled":
            pipe.unet = torch.compile(pipe.unet)
        batches = args.batch_sizes[:1]    # the peers are compared at the first batch size

        def call(B):
            prompts = [f"a photo of object number {i} on a table" for i in range(B)]
            return lambda: pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.0,
                                height=args.size, width=args.size, output_type="pt")
    else:
        nets = random_networks(cfg, device)
        be = TorchBackend(nets, device, dtype, quant="fp8" if mode == "ours-fp8" else None)
        pipe = Text2Image(be, cfg, tok)
        batches = args.batch_sizes
        out["weights_MiB"] = torch.cuda.memory_allocated() / 2**20

        def call(B):
            req = Request([f"a photo of object number {i} on a table" for i in range(B)], list(range(B)),
                          args.steps, 7.0, args.size, args.size)
            return lambda: pipe(req)
    out["build_s"] = time.perf_counter() - t0
    # The path's own peak from here: its weights as it runs them, not the fp32 draw they were cast from.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for B in batches:
            fn = call(B)
            t1 = time.perf_counter()
            fn()                                       # capture / compile / cudnn autotuning
            sync(device)
            r = out["end_to_end"][B] = {"first_call_s": time.perf_counter() - t1}
            reps = max(2, min(3, args.repeats)) if mode.startswith("diffusers") else args.repeats
            r["ms"] = time_ms(fn, device, warmup=1, repeats=reps)
            r["img_per_s"] = 1000 * B / r["ms"]
            r["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
            print(f"  [{mode}] B={B}: {r['ms']:.1f} ms (first call {r['first_call_s']:.1f} s), "
                  f"peak {r['peak_MiB']:.0f} MiB", file=sys.stderr, flush=True)
    return out


def run_isolated(mode: str, args) -> dict | None:
    """isolated_main in a fresh `python bench.py --isolated MODE` process; None if it failed."""
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), "--isolated", mode, "--preset", args.preset,
           "--dtype", args.dtype, "--steps", str(args.steps), "--size", str(args.size),
           "--repeats", str(args.repeats), "--batch-sizes", *map(str, args.batch_sizes)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stderr.rstrip()[-3000:], flush=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("ISOLATED ")]
    if p.returncode != 0 or not lines:
        print(f"isolated {mode} failed (exit {p.returncode})", flush=True)
        return None
    res = json.loads(lines[-1][len("ISOLATED "):])
    res["end_to_end"] = {int(B): r for B, r in res["end_to_end"].items()}
    res["process_s"] = time.perf_counter() - t0
    return res


# -- the run ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.enable()          # a crash inside a native library still names the Python line
    if args.from_json:
        report = load_report(args.from_json)
        if "dtype" not in report:   # a --cold-start-only run
            print_cold_start(report.get("cold_start"))
            return 0
        args.dtype, args.size, args.steps = report["dtype"], report["size"], report["steps"]
        print_table(report, args)
        if args.chart:
            chart(report, args)
        return 0
    if args.cfg_parallel:
        return cfg_parallel_main(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    if args.isolated:
        if device.type != "cuda":
            print("error: --isolated needs --device cuda", file=sys.stderr)
            return 2
        print("ISOLATED " + json.dumps(isolated_main(args)), flush=True)
        return 0
    # What runs in other processes goes first, while this one holds no GPU memory or context:
    # the cold start (process start -> first PNG), then each path alone.
    cold = cold_start(args, PRESETS[args.preset]) if args.cold_start or args.cold_start_only else None
    if args.cold_start_only:
        print_cold_start(cold)
        if args.json:
            args.json.write_text(json.dumps({"argv": sys.argv[1:], "cold_start": cold}, indent=2, default=str))
        return 0
    isolated = {}
    if device.type == "cuda" and not args.no_isolated:
        have_diffusers = importlib.util.find_spec("diffusers") is not None and not args.no_diffusers
        modes = (["ours-fp16"] + (["ours-fp8"] if args.fp8 else [])
                 + (["diffusers"] if have_diffusers else []) + (["diffusers-compiled"] if have_diffusers and not args.no_peer_compile else []))
        for mode in modes:
            res = run_isolated(mode, args)
            if res is not None:
                isolated[mode] = res
    dtype = loading.DTYPES[args.dtype]
    cfg = PRESETS[args.preset]
    f = cfg.vae_decoder.downsample
    h = w = args.size // f
    u = cfg.uvit
    torch.backends.cuda.matmul.allow_tf32 = False          # the fp32 reference is real fp32
    torch.backends.cudnn.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "size": args.size,
              "steps": args.steps, "argv": sys.argv[1:], "components": {}, "end_to_end": {}, "accuracy": {},
              "isolated": isolated}
    if device.type == "cuda":
        n = 1 << 28
        a = torch.empty(n, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        report["copy_GBps"] = 2 * n / time_ms(lambda: b.copy_(a), device) / 1e6
        del a, b
    print(f"# {report['device']}, torch {torch.__version__}, preset {args.preset}, {args.size}x{args.size}, "
          f"{args.steps} steps, fast path {args.dtype}", flush=True)
    if cold is not None:
        report["cold_start"] = cold

    def save_partial():   # so that a run stopped by a time limit keeps what it measured (beside --json, never over it)
        if args.json:
            accuracy = {k: v for k, v in report["accuracy"].items() if k != "_outputs"}
            partial = args.json.with_name(args.json.stem + ".partial.json")
            partial.write_text(json.dumps({**report, "accuracy": accuracy, "partial": True}, indent=2, default=str))
    save_partial()

    t0 = time.perf_counter()
    use_fp8 = args.fp8 and device.type == "cuda"
    ref, fast, *fast8 = build_networks(cfg, device, dtype, copies=2 if use_fp8 else 1)
    print(f"built random {args.preset} networks in {time.perf_counter() - t0:.1f} s", flush=True)
    tok = make_tokenizer()
    pipe_ref = Text2Image(TorchBackend(ref, device, torch.float32), cfg, tok)
    pipe_fast = Text2Image(TorchBackend(fast, device, dtype), cfg, tok)
    pipe_fp8 = Text2Image(TorchBackend(fast8[0], device, dtype, quant="fp8"), cfg, tok) if use_fp8 else None
    pipe_compiled = None
    if args.compile:
        pipe_compiled = Text2Image(TorchBackend(fast, device, dtype, compile=True), cfg, tok)

    gen = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    # ---- components --------------------------------------------------------------------------
    comp = report["components"]
    for B in args.batch_sizes:
        prompts = [f"a photo of object number {i} on a table" for i in range(B)]
        ids = tok(prompts).to(device)
        rows = 2 * B
        z, clip_img, text = rnd(rows, u.in_chans, h, w), rnd(rows, 1, u.clip_img_dim), rnd(rows, u.num_text_tokens, u.text_dim)
        t_img = torch.rand(rows, generator=gen).to(device) * 1000
        t_text = torch.cat([torch.zeros(B), torch.full((B,), 1000.0)]).to(device)
        dt_ = torch.ones(rows, dtype=torch.long, device=device)
        latent = rnd(B, u.in_chans, h, w)
        r = comp[B] = {}
        with torch.no_grad():
            impls = [("fp32", pipe_ref, torch.float32), (args.dtype, pipe_fast, dtype)]
            for tag, pipe, dt in impls + ([("fp8", pipe_fp8, dtype)] if pipe_fp8 else []):
                be = pipe.backend
                args_uvit = (z.to(dt), clip_img.to(dt), text.to(dt), t_img, t_text, dt_)
                run_text = lambda: be.encode_text(ids)
                run_uvit = lambda: be.uvit(*args_uvit)
                run_dec = lambda: be.decode(latent.to(dt))
                if tag == "fp8":   # only the UViT differs from the fp16 path
                    if B == args.batch_sizes[0]:
                        report["fp8_scales"] = fp8_scale_report(be, run_uvit)
                    r["uvit_cfg_fp8_ms"] = time_ms(graphed(run_uvit, device), device, repeats=30)
                    if B == args.batch_sizes[0]:
                        report["accuracy"]["_outputs"]["fp8"] = {
                            "uvit": torch.cat([o.float().flatten(1) for o in be.uvit(*args_uvit)], 1).cpu()}
                    continue
                if be.graph_safe:   # fixed-shape calls replay as CUDA graphs on the fast path
                    set_uvit_fusions(be.uvit_net, False)
                    r[f"uvit_cfg_{tag}_unfused_ms"] = time_ms(graphed(run_uvit, device), device, repeats=30)
                    set_uvit_fusions(be.uvit_net, True)
                    run_uvit = graphed(run_uvit, device)
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        flash = graphed(lambda: be.uvit_net(*args_uvit), device)
                    r[f"uvit_cfg_{tag}_flash_attention_ms"] = time_ms(flash, device, repeats=30)
                    r[f"decoder_{tag}_torch_groupnorm_ms"] = time_ms(lambda: unfused(be, latent.to(dt)), device, repeats=10)
                r[f"text_encoder_{tag}_ms"] = time_ms(run_text, device)
                r[f"uvit_cfg_{tag}_ms"] = time_ms(run_uvit, device, repeats=10 if tag == "fp32" else 30)
                r[f"decoder_{tag}_ms"] = time_ms(run_dec, device, repeats=5 if tag == "fp32" else 20)
                if B == args.batch_sizes[0]:
                    report["accuracy"].setdefault("_outputs", {})[tag] = {
                        "text_encoder": be.encode_text(ids).float().cpu(),
                        "uvit": torch.cat([o.float().flatten(1) for o in be.uvit(*args_uvit)], 1).cpu(),
                        "decoder": be.decode(latent.to(dt)).float().cpu()}
            if pipe_compiled is not None and B == args.batch_sizes[0]:   # compiles once per shape: one B
                be = pipe_compiled.backend
                args_uvit = (z.to(dtype), clip_img.to(dtype), text.to(dtype), t_img, t_text, dt_)
                t1 = time.perf_counter()
                be.uvit(*args_uvit)
                sync(device)
                r["compile_s"] = time.perf_counter() - t1
                r[f"uvit_cfg_{args.dtype}_compiled_ms"] = time_ms(graphed(lambda: be.uvit(*args_uvit), device), device, repeats=30)
        print(f"components B={B}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)

    save_partial()
    outs = report["accuracy"].pop("_outputs")
    for name in ("text_encoder", "uvit", "decoder"):
        report["accuracy"][name] = errors(outs[args.dtype][name], outs["fp32"][name])
    if "fp8" in outs:
        report["accuracy"]["uvit_fp8"] = errors(outs["fp8"]["uvit"], outs["fp32"]["uvit"])

    if args.profile and device.type == "cuda":
        report["profile_uvit"] = profile_uvit(pipe_fast.backend, u, h, w, device, dtype)
        print("profile: " + json.dumps(report["profile_uvit"], indent=1), flush=True)
        if pipe_fp8:
            report["profile_uvit_fp8"] = profile_uvit(pipe_fp8.backend, u, h, w, device, dtype)
            print("profile fp8: " + json.dumps(report["profile_uvit_fp8"], indent=1), flush=True)

    # ---- end to end --------------------------------------------------------------------------
    e2e = report["end_to_end"]
    diff_pipe = None
    if args.diffusers_in_process and not args.no_diffusers and device.type == "cuda":
        try:
            diff_pipe = diffusers_pipeline(cfg, device, dtype)
        except ImportError as e:
            print(f"diffusers not measured: {e}", flush=True)
    for B in args.batch_sizes:
        prompts = [f"a photo of object number {i} on a table" for i in range(B)]
        req = Request(prompts, list(range(B)), args.steps, 7.0, args.size, args.size)
        r = e2e[B] = {}
        impls = [(args.dtype, pipe_fast)] + ([("fp8", pipe_fp8)] if pipe_fp8 else [])
        impls += [("fp32", pipe_ref)] if B in args.fp32_e2e_batches else []
        if pipe_compiled is not None and B == args.batch_sizes[0]:
            impls.append((f"{args.dtype}_compiled", pipe_compiled))
        for tag, pipe in impls:
            reps = args.repeats if tag != "fp32" else max(1, min(2, args.repeats))
            r[f"{tag}_peak_MiB"] = peak_mb(device, lambda: pipe(req))          # also the warm-up / capture
            r[f"{tag}_ms"] = time_ms(lambda: pipe(req), device, warmup=0, repeats=reps)
            print(f"  e2e B={B} {tag}: {r[f'{tag}_ms']:.1f} ms", flush=True)
        if diff_pipe is not None and B == args.batch_sizes[0]:
            def run_diffusers():
                diff_pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.0,
                          height=args.size, width=args.size, output_type="pt")
            try:   # diagnosis of the in-process peer (against its isolated run)
                t1 = time.perf_counter()
                run_diffusers()
                sync(device)
                r[f"diffusers_inproc_{args.dtype}_first_s"] = time.perf_counter() - t1
                r[f"diffusers_inproc_{args.dtype}_ms"] = time_ms(run_diffusers, device, warmup=1, repeats=3)
            except Exception as e:   # the peer failing must not lose our own numbers
                print(f"  diffusers failed at B={B}: {type(e).__name__}: {e}", flush=True)
                diff_pipe = None
        for k in [k for k in r if k.endswith("_ms")]:
            r[k.replace("_ms", "_img_per_s")] = 1000 * B / r[k]
        print(f"end-to-end B={B}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)

    save_partial()
    # ---- final image accuracy: same seed, same initial noise --------------------------------
    req = Request(["a red cube on a blue sphere"], [42], args.steps, 7.0, args.size, args.size)
    with torch.no_grad():
        img_ref = decoded(pipe_ref, req)
        img_fast = decoded(pipe_fast, req)
    report["accuracy"]["image_[-1,1]"] = errors(img_fast, img_ref)
    q_ref, q_fast = to_levels(img_ref), to_levels(img_fast)
    report["accuracy"]["image_uint8_levels"] = {"max": (q_fast - q_ref).abs().max().item(),
                                                "mean": (q_fast - q_ref).abs().float().mean().item()}
    if pipe_fp8:
        with torch.no_grad():
            img_8 = decoded(pipe_fp8, req)
        report["accuracy"]["image_fp8_[-1,1]"] = errors(img_8, img_ref)
        q_8 = to_levels(img_8)
        report["accuracy"]["image_fp8_uint8_levels"] = {"max": (q_8 - q_ref).abs().max().item(),
                                                        "mean": (q_8 - q_ref).abs().float().mean().item()}

    print_table(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        args.json.with_name(args.json.stem + ".partial.json").unlink(missing_ok=True)
    if args.chart:
        chart(report, args)
    return 0


def load_report(path: Path) -> dict:
    """A --json run as main() built it: JSON made the batch-size keys strings."""
    report = json.loads(Path(path).read_text())
    by_batch = [report.get("components", {}), report.get("end_to_end", {})]
    by_batch += [res["end_to_end"] for res in report.get("isolated", {}).values()]
    for d in by_batch:
        for k in [k for k in d if k.isdigit()]:
            d[int(k)] = d.pop(k)
    return report


def fp8_scale_report(backend, run_uvit) -> dict:
    """Per fp8 layer: weight-scale min/median/max and the max activation |x| seen on one
    calibration call (eager: the recording syncs with the host)."""
    from models import fp8
    amax = fp8.activation_amax(backend.uvit_net, run_uvit)
    return {name: dict(s, act_amax=amax[name]) for name, s in backend.fp8_weight_stats.items()}


def decoded(pipe: Text2Image, req: Request) -> torch.Tensor:
    """The final image in [-1, 1] (before uint8), from the pipeline's own sampling."""
    z_holder = {}
    orig = pipe.backend.decode

    def keep(z):
        out = orig(z)
        z_holder["img"] = out.float().cpu()
        return out

    pipe.backend.decode = keep
    try:
        pipe(req)
    finally:
        pipe.backend.decode = orig
    return z_holder["img"]


def to_levels(img):
    return ((img + 1) * 0.5).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.int16)


def profile_uvit(backend, u, h, w, device, dtype) -> dict:
    """Kernel time of one eager CFG-batched UViT call (batch 1), by kind."""
    from torch.profiler import ProfilerActivity, profile
    rows = 2
    a = (torch.randn(rows, u.in_chans, h, w, device=device, dtype=dtype), torch.randn(rows, 1, u.clip_img_dim, device=device, dtype=dtype),
         torch.randn(rows, u.num_text_tokens, u.text_dim, device=device, dtype=dtype), torch.full((rows,), 500.0, device=device),
         torch.tensor([0.0, 1000.0], device=device), torch.ones(rows, dtype=torch.long, device=device))
    with torch.no_grad():
        for _ in range(3):
            backend.uvit(*a)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            backend.uvit(*a)
            torch.cuda.synchronize()
    kinds = {"gemm": 0.0, "attention": 0.0, "layernorm": 0.0, "fp8 quantize": 0.0, "elementwise/other": 0.0}
    kernels = []
    for e in prof.key_averages():
        if e.device_type.name != "CUDA":
            continue
        name, us = e.key.lower(), e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        kernels.append((us, e.count, e.key[:90]))
        if any(s in name for s in ("gemm", "cutlass", "xmma", "sm90", "ampere_", "cublas")) and "flash" not in name:
            kinds["gemm"] += us
        elif any(s in name for s in ("flash", "fmha", "attention", "mem_eff", "sdpa")):
            kinds["attention"] += us
        elif "norm" in name:
            kinds["layernorm"] += us
        elif "quantize" in name:
            kinds["fp8 quantize"] += us
        else:
            kinds["elementwise/other"] += us
    total = sum(kinds.values())
    top = [{"ms": us / 1e3, "calls": n, "kernel": k} for us, n, k in sorted(kernels, reverse=True)[:10]]
    return {k: {"ms": v / 1e3, "share": v / total} for k, v in kinds.items() if v} | {"total_ms": total / 1e3, "top_kernels": top}


def print_table(report, args):
    dt = args.dtype
    print(f"\n## {report['device']} — random v1-shape weights, {args.size}x{args.size}, {args.steps} steps "
          f"(medians, ms; speed-up vs fp32)")
    print(f"{'component':<26}{'B':>3}{'fp32':>10}{dt:>10}{'speed-up':>10}")
    for B, r in report["components"].items():
        for name in ("text_encoder", "uvit_cfg", "decoder"):
            a, b = r[f"{name}_fp32_ms"], r[f"{name}_{dt}_ms"]
            print(f"{name:<26}{B:>3}{a:>10.2f}{b:>10.2f}{a / b:>9.1f}x")
        for key, label in ((f"uvit_cfg_{dt}_unfused_ms", f"uvit_cfg ({dt}, unfused)"), ("uvit_cfg_fp8_ms", "uvit_cfg (fp8)")):
            if key in r:
                print(f"{label:<26}{B:>3}{'':>10}{r[key]:>10.2f}")
        if f"uvit_cfg_{dt}_compiled_ms" in r:
            print(f"{'uvit_cfg (compiled)':<26}{B:>3}{'':>10}{r[f'uvit_cfg_{dt}_compiled_ms']:>10.2f}"
                  f"   compile {r['compile_s']:.0f} s")
    print(f"\n{'end to end (ms)':<16}{'B':>3}{'fp32':>9}{dt:>9}{'fp8':>9}{dt + ' img/s':>11}{'fp8 img/s':>10}")
    for B, r in report["end_to_end"].items():
        nan = float("nan")
        print(f"{'in this process':<16}{B:>3}{r.get('fp32_ms', nan):>9.0f}{r[f'{dt}_ms']:>9.1f}{r.get('fp8_ms', nan):>9.1f}"
              f"{r[f'{dt}_img_per_s']:>11.2f}{r.get('fp8_img_per_s', nan):>10.2f}")
        if f"{dt}_compiled_ms" in r:
            print(f"{'  compiled':<16}{B:>3}{'':>9}{r[f'{dt}_compiled_ms']:>9.1f}")
        if f"diffusers_inproc_{dt}_ms" in r:
            print(f"{'  diffusers':<16}{B:>3}  {r[f'diffusers_inproc_{dt}_ms']:.0f} ms in this process")
    iso = report.get("isolated", {})
    if iso:
        print("\nend to end, each path alone in a fresh process (ms per batch; peak = that path's own peak allocated MiB)")
        ours = iso.get(f"ours-{dt}", {}).get("end_to_end", {})
        for mode, res in iso.items():
            extra = f"   first call {res['end_to_end'][next(iter(res['end_to_end']))]['first_call_s']:.0f} s" \
                if mode == "diffusers-compiled" else ""
            cells = []
            for B, e in res["end_to_end"].items():
                vs = f", {e['ms'] / ours[B]['ms']:.1f}x ours" if mode.startswith("diffusers") and B in ours else ""
                cells.append(f"B={B} {e['ms']:.1f} ({e['img_per_s']:.2f} img/s, peak {e['peak_MiB']:.0f}{vs})")
            print(f"  {mode:<20}" + "; ".join(cells) + extra)
    print(f"\naccuracy of {dt} vs fp32 (abs: max/mean/median; rel: max/mean/median; rel L2)")
    for name, e in report["accuracy"].items():
        if "abs" in e:
            a, r_ = e["abs"], e["rel"]
            print(f"  {name:<20} abs {a['max']:.2e}/{a['mean']:.2e}/{a['median']:.2e}  "
                  f"rel {r_['max']:.2e}/{r_['mean']:.2e}/{r_['median']:.2e}  L2 {e['rel_l2']:.2e}")
        else:
            print(f"  {name:<20} max {e['max']} levels, mean {e['mean']:.3f} levels")
    for key, label in (("profile_uvit", dt), ("profile_uvit_fp8", "fp8")):
        if key in report:
            p = report[key]
            print(f"\n{label} UViT call, B=1 (eager kernel time {p['total_ms']:.2f} ms): " +
                  ", ".join(f"{k} {v['ms']:.2f} ms ({100 * v['share']:.0f}%)" for k, v in p.items() if isinstance(v, dict)))
    if "fp8_scales" in report:
        sc = report["fp8_scales"]
        for kind in ("qkv", "proj", "fc1", "fc2", "skip_linear"):
            rows = [v for k, v in sc.items() if k.endswith(kind)]
            if rows:
                print(f"fp8 {kind:<12} weight scale {min(r['w_scale_min'] for r in rows):.2e}.."
                      f"{max(r['w_scale_max'] for r in rows):.2e} (median of medians "
                      f"{statistics.median(r['w_scale_median'] for r in rows):.2e}), "
                      f"activation amax {min(r['act_amax'] for r in rows):.1f}..{max(r['act_amax'] for r in rows):.1f}")
    if "copy_GBps" in report:
        print(f"device copy bandwidth {report['copy_GBps']:.0f} GB/s")
    print_cold_start(report.get("cold_start"))


def print_cold_start(cold: dict | None) -> None:
    if not cold:
        return
    print(f"\ncold start: process start -> first PNG on disk ({cold['size']}x{cold['size']}, {cold['steps']} steps, "
          f"page cache warm)")
    for who in ("ours", "diffusers"):
        for i, r in enumerate(cold.get(who, [])):
            parts = ", ".join(f"{k[:-2]} {r[k]:.2f}" for k in ("imports_s", "load_s", "encode_s", "capture_s", "sample_s",
                                                               "decode_s") if k in r)
            print(f"  {who:<10} run {i + 1}: {r['to_png_s']:.2f} s" + (f"  ({parts})" if parts else ""))


def chart(report, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dt = args.dtype
    e2e = report["end_to_end"]
    Bs = list(e2e)
    series = {f"ours {dt}": {B: e2e[B][f"{dt}_ms"] for B in Bs},
              "ours fp8": {B: e2e[B]["fp8_ms"] for B in Bs if "fp8_ms" in e2e[B]},
              "ours fp32 (reference)": {B: e2e[B]["fp32_ms"] for B in Bs if "fp32_ms" in e2e[B]}}
    for mode, label in (("diffusers", f"diffusers {dt}"), ("diffusers-compiled", f"diffusers {dt} + torch.compile")):
        if mode in report.get("isolated", {}):
            series[label] = {B: e["ms"] for B, e in report["isolated"][mode]["end_to_end"].items()}
    cold = report.get("cold_start") or {}
    runs = {who: min(r["to_png_s"] for r in cold[who]) for who in ("ours", "diffusers") if cold.get(who)}
    fig, axes = plt.subplots(1, 3 if runs else 2, figsize=(15 if runs else 10, 4))
    ax1, ax2 = axes[:2]
    for label, pts in series.items():
        pts = sorted(pts.items())
        if pts:
            ax1.plot(*zip(*[(b, v / 1e3) for b, v in pts]), "o-", label=label)
            ax2.plot(*zip(*[(b, 1e3 * b / v) for b, v in pts]), "o-", label=label)
    ax1.set(xlabel="batch size", ylabel="seconds per batch", title=f"end to end, {args.steps} steps, {args.size}²")
    ax2.set(xlabel="batch size", ylabel="images / s", title=report["device"])
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    if runs:   # best of the runs: page cache warm, so the spread is the host's noise
        ax3 = axes[2]
        bars = ax3.bar(list(runs), list(runs.values()), color=["tab:blue", "tab:red"][:len(runs)])
        ax3.bar_label(bars, fmt="%.1f s")
        n = min(len(cold[who]) for who in runs)
        ax3.set(ylabel="seconds", title=f"process start -> first PNG ({cold['size']}², {cold['steps']} steps, best of {n})")
    fig.tight_layout()
    fig.savefig(args.chart, dpi=120)


# -- CFG parallelism: one GPU against a CFG pair of two ------------------------------------------

def cfg_parallel_main(args) -> int:
    """Under `torchrun --nproc-per-node 2`: per batch size, end to end on one GPU (rank 0 alone,
    rank 1 waiting) and on the CFG pair (rank 0 conditional rows, rank 1 unconditional), in one
    run with the same random weights; the UViT call on 2B rows (one GPU) and on B rows (each
    rank of a pair); the pair's per-step all-gather alone, eager and captured as a graph of
    `--steps` exchanges (the per-step cost inside the sampling). Rank 0 prints and writes --json."""

    import torch.distributed as dist

    from unidiffuser import parallel
    try:
        layout = parallel.init_from_env(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if layout.cfg_pair is None or layout.world_size != 2:
        print("error: --cfg-parallel runs as one CFG pair: torchrun --nproc-per-node 2 bench.py --cfg-parallel ...",
              file=sys.stderr)
        return 2
    device, rank, pair_half = layout.device, layout.rank, layout.cfg_pair
    dtype = loading.DTYPES[args.dtype] if device.type == "cuda" else torch.float32   # CPU: a smoke test
    cfg = PRESETS[args.preset]
    u, f = cfg.uvit, cfg.vae_decoder.downsample
    h = w = args.size // f
    nets = random_networks(cfg, device)                        # the same weights on both ranks (same seed)
    backend = TorchBackend(nets, device, dtype)
    tok = make_tokenizer()
    one, pair = Text2Image(backend, cfg, tok), Text2Image(backend, cfg, tok, cfg_pair=pair_half)
    names = [None, None]
    dist.all_gather_object(names, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    report = {"mode": "cfg_parallel", "devices": names, "torch": torch.__version__, "preset": args.preset,
              "dtype": str(dtype).removeprefix("torch."), "size": args.size, "steps": args.steps,
              "argv": sys.argv[1:], "end_to_end": {}, "uvit_call_ms": {}, "exchange_us": {}}
    if rank == 0:
        print(f"# CFG parallel: {names}, torch {torch.__version__}, preset {args.preset}, "
              f"{args.size}x{args.size}, {args.steps} steps, {report['dtype']}", flush=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for B in args.batch_sizes:
            req = Request([f"a photo of object number {i} on a table" for i in range(B)], list(range(B)),
                          args.steps, 7.0, args.size, args.size)
            r = report["end_to_end"][B] = {}
            if rank == 0:                              # one GPU, as run.py without torchrun
                one(req)                               # capture
                r["one_gpu_ms"] = time_ms(lambda: one(req), device, warmup=0, repeats=args.repeats)
                img_one = one(req).images
                c = report["uvit_call_ms"][B] = {}
                for rows in (2 * B, B):                # one GPU's call, and each pair rank's
                    a = (torch.randn(rows, u.in_chans, h, w, generator=gen).to(device, dtype),
                         torch.randn(rows, 1, u.clip_img_dim, generator=gen).to(device, dtype),
                         torch.randn(rows, u.num_text_tokens, u.text_dim, generator=gen).to(device, dtype),
                         torch.full((rows,), 500.0, device=device), torch.zeros(rows, device=device),
                         torch.ones(rows, dtype=torch.long, device=device))
                    c[f"{rows}_rows"] = time_ms(graphed(lambda: backend.uvit(*a), device), device, repeats=30)
            dist.barrier()
            pair(req)                                  # both ranks: capture, with the exchange inside
            r["cfg_pair_ms"] = time_ms(lambda: pair(req), device, warmup=0, repeats=args.repeats)
            img_pair = pair(req).images
            x = torch.randn(B, u.in_chans * h * w + u.clip_img_dim, generator=gen).to(device, dtype)
            e = report["exchange_us"][B] = {"bytes_per_rank": x.numel() * x.element_size()}
            e["eager"] = 1e3 * time_ms(lambda: pair_half.gather(x), device, repeats=50)
            if device.type == "cuda":
                loop = graphed(lambda: [pair_half.gather(x) for _ in range(args.steps)][-1], device)
                e["in_graph_per_step"] = 1e3 * time_ms(loop, device, repeats=20) / args.steps
            if rank == 0:
                r["speed_up"] = r["one_gpu_ms"] / r["cfg_pair_ms"]
                r["image_max_level_diff"] = (img_one.int() - img_pair.int()).abs().max().item()
                print(f"B={B}: one GPU {r['one_gpu_ms']:.1f} ms, CFG pair {r['cfg_pair_ms']:.1f} ms, "
                      f"{r['speed_up']:.2f}x (images differ by <= {r['image_max_level_diff']} levels); "
                      f"UViT call {', '.join(f'{k} {v:.2f} ms' for k, v in report['uvit_call_ms'][B].items())}; "
                      f"exchange {', '.join(f'{k} {v:.1f}' for k, v in e.items())} (us)", flush=True)
    if rank == 0 and args.json:
        args.json.write_text(json.dumps(report, indent=2))
    layout.close()
    return 0


# -- cold start ---------------------------------------------------------------------------------
# What a user waits for: process start -> first PNG on disk, page cache warm (each folder is read
# once before timing). Ours: `run.py` on a converted folder. diffusers: from_pretrained of a folder
# written with save_pretrained (the same random weights' shapes), then its first image.

COLD_PROMPT = "an elephant under the sea"

DIFFUSERS_COLD = """
import sys, torch
from diffusers import UniDiffuserPipeline
folder, device, dtype, steps, size, out = sys.argv[1:7]
pipe = UniDiffuserPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype), text_tokenizer=None).to(device)
pipe.set_progress_bar_config(disable=True)
pipe.set_text_to_image_mode()
image = pipe(prompt=sys.argv[7], num_inference_steps=int(steps), guidance_scale=7.0, height=int(size), width=int(size),
             generator=torch.Generator(device).manual_seed(1234)).images[0]
image.save(out)
"""


def cold_start(args, cfg) -> dict:
    """In --cold-start-dir (kept, reused), else in a temporary folder removed afterwards."""
    import tempfile

    if args.cold_start_dir is not None:      # its model folders are kept; the runs' files are not
        args.cold_start_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="runs-", dir=args.cold_start_dir) as scratch:
            return _cold_start(args, cfg, args.cold_start_dir, Path(scratch))
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as work:
        return _cold_start(args, cfg, Path(work), Path(work))


def _cold_start(args, cfg, work: Path, scratch: Path) -> dict:
    """Model folders in work (reused when there), everything else in scratch (the caller's)."""
    import re
    import shutil
    import subprocess

    root = ROOT_DIR
    torch_dtype = {"fp16": "float16", "bf16": "bfloat16"}[args.dtype] if args.device != "cpu" else "float32"
    ours_dtype = args.dtype if args.device != "cpu" else "fp32"
    model = work / f"model-{args.preset}"
    if not (model / "manifest.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, str(root / "convert_weights.py"), "--random", args.preset, "--src",
                        str(scratch / f"src-{args.preset}"), "--out", str(model)], check=True, cwd=root)
        print(f"cold start: wrote {model} in {time.perf_counter() - t:.0f} s", flush=True)
    report = {"prompt": COLD_PROMPT, "steps": args.steps, "size": args.size, "device": args.device, "ours": [], "diffusers": []}

    def warm_cache(folder: Path):
        for f in folder.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass

    def first_png(cmd, out: Path) -> tuple[float, float, str]:
        """Seconds from before Popen to the first PNG in out, and to the process's exit."""
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        png = None
        while png is None and proc.poll() is None:
            png = next((time.perf_counter() - t0 for f in out.glob("*.png") if not f.name.startswith(".")), None)
            time.sleep(0.005)
        log = proc.communicate()[0]
        done = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed ({proc.returncode}):\n{log[-2000:]}")
        if png is None:
            png = next((done for f in out.glob("*.png")), None)
        return png, done, log

    warm_cache(model)
    for run in range(2):
        out = scratch / f"out-ours-{run}"
        cmd = [sys.executable, str(root / "run.py"), "--model-dir", str(model), "--prompt", COLD_PROMPT, "--out", str(out),
               "--device", args.device, "--dtype", ours_dtype, "--steps", str(args.steps),
               "--height", str(args.size), "--width", str(args.size)]
        png, done, log = first_png(cmd, out)
        r = {"to_png_s": png, "to_exit_s": done}
        m = re.search(r"loaded in ([\d.]+) s \(imports ([\d.]+) s\)", log)
        if m:
            r["load_s"], r["imports_s"] = float(m.group(1)), float(m.group(2))
        sidecar = next(out.glob("*.json"), None)
        if sidecar is not None:
            r.update(json.loads(sidecar.read_text())["time_per_stage_s"])
        report["ours"].append(r)
        print(f"cold start, ours run {run + 1}: first PNG at {png:.2f} s ("
              + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "to_png_s") + ")", flush=True)

    if args.no_diffusers:
        return report
    try:
        folder = work / f"diffusers-{args.preset}-{torch_dtype}"
        if not (folder / "model_index.json").is_file():
            pipe = diffusers_pipeline(cfg, "cpu", getattr(torch, torch_dtype))
            # GPT-2's tied lm_head/wte cannot be saved as safetensors; the tiny decoder is unused
            head = pipe.text_decoder.transformer.lm_head
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            pipe.save_pretrained(str(folder))
            del pipe
        warm_cache(folder)
        script = scratch / "diffusers_cold.py"
        script.write_text(DIFFUSERS_COLD)
        for run in range(2):
            out = scratch / f"out-diffusers-{run}"
            cmd = [sys.executable, str(script), str(folder), args.device, torch_dtype, str(args.steps), str(args.size),
                   str(out / "image.png"), COLD_PROMPT]
            png, done, _ = first_png(cmd, out)
            report["diffusers"].append({"to_png_s": png, "to_exit_s": done})
            print(f"cold start, diffusers run {run + 1}: first PNG at {png:.2f} s", flush=True)
    except (ImportError, RuntimeError, OSError) as e:   # the peer failing must not lose our numbers
        print(f"cold start, diffusers not measured: {type(e).__name__}: {e}", flush=True)
    return report


ROOT_DIR = Path(__file__).resolve().parent


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)    # as the commands do (unidiffuser/cli.py): no teardown of graphs and NCCL groups
