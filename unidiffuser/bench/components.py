"""Per network, at each batch size: the text encoder (+ prefix), one CFG-batched UViT call and
the VAE decoder, for each path; the fast path also with its fusions off and with flash attention."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fusions import decoder_without_fusions, uvit_fusions_off
from .nets import Paths, prompts
from .profiling import fp8_scale_report
from .timing import Clock, graphed, sync


@dataclass
class Inputs:
    """One batch size's inputs, fp32 (each path casts them to its dtype)."""
    ids: torch.Tensor
    uvit: tuple        # z, clip_img, text, t_img, t_text, data_type: 2B rows, as CFG runs them
    latent: torch.Tensor

    @classmethod
    def draw(cls, B: int, cfg, h: int, w: int, tok, gen: torch.Generator, device) -> "Inputs":
        u, rows = cfg.uvit, 2 * B

        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(device)

        z, clip_img, text = rnd(rows, u.in_chans, h, w), rnd(rows, 1, u.clip_img_dim), rnd(rows, u.num_text_tokens, u.text_dim)
        t_img = torch.rand(rows, generator=gen).to(device) * 1000
        t_text = torch.cat([torch.zeros(B), torch.full((B,), 1000.0)]).to(device)
        data_type = torch.ones(rows, dtype=torch.long, device=device)
        latent = rnd(B, u.in_chans, h, w)
        return cls(tok(prompts(B)).to(device), (z, clip_img, text, t_img, t_text, data_type), latent)

    def uvit_args(self, dt) -> tuple:
        z, clip_img, text, *rest = self.uvit
        return (z.to(dt), clip_img.to(dt), text.to(dt), *rest)


def components(report: dict, paths: Paths, clock: Clock, args, cfg, h: int, w: int) -> dict:
    """Fills report["components"][B]; returns each path's outputs at the first batch size (for
    the accuracy against fp32): tag -> network -> tensor."""
    dtype, device = paths.fast.dtype, clock.device
    gen = torch.Generator().manual_seed(1)
    outs = {}
    for B in args.batch_sizes:
        inp = Inputs.draw(B, cfg, h, w, paths.tokenizer, gen, device)
        first = B == args.batch_sizes[0]
        r = report["components"][B] = {}
        with torch.no_grad():
            for tag, pipe, dt in (("fp32", paths.ref, torch.float32), (args.dtype, paths.fast, dtype)):
                out = measure_networks(r, tag, pipe.backend, inp, dt, clock)
                if first:
                    outs[tag] = out()
            if paths.fp8 is not None:   # only the UViT differs from the fp16 path
                out = measure_fp8_uvit(r, paths.fp8.backend, inp.uvit_args(dtype), clock, report if first else None)
                if first:
                    outs["fp8"] = {"uvit": out()}
            if paths.compiled is not None and first:   # compiles once per shape: one B
                measure_compiled_uvit(r, paths.compiled.backend, inp.uvit_args(dtype), args.dtype, clock)
        print(f"components B={B}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
    return outs


def uvit_output(be, a) -> torch.Tensor:
    z_out, clip_out, _ = be.uvit(*a)     # the CFG call of text-to-image: its state is the image stream
    return torch.cat([o.float().flatten(1) for o in (z_out, clip_out)], 1).cpu()


def measure_networks(r: dict, tag: str, be, inp: Inputs, dt, clock: Clock):
    """One path's three networks into r; returns a function computing their outputs (on the CPU)."""
    a = inp.uvit_args(dt)
    run_text = lambda: be.encode_text(inp.ids)
    run_uvit = lambda: be.uvit(*a)
    run_dec = lambda: be.decode(inp.latent.to(dt))
    if be.graph_safe:   # fixed-shape calls replay as CUDA graphs on the fast path
        run_uvit = measure_fast_variants(r, tag, be, a, run_uvit, lambda: inp.latent.to(dt), clock)
    r[f"text_encoder_{tag}_ms"] = clock.ms(run_text)
    r[f"uvit_cfg_{tag}_ms"] = clock.ms(run_uvit, repeats=10 if tag == "fp32" else 30)
    r[f"decoder_{tag}_ms"] = clock.ms(run_dec, repeats=5 if tag == "fp32" else 20)
    return lambda: {"text_encoder": be.encode_text(inp.ids).float().cpu(), "uvit": uvit_output(be, a),
                    "decoder": be.decode(inp.latent.to(dt)).float().cpu()}


def measure_fast_variants(r: dict, tag: str, be, a: tuple, run_uvit, latent, clock: Clock):
    """The fast path's UViT call with its fusions off and with flash attention, its decoder with
    its fusions off; returns the UViT call graphed (as the fast path runs it)."""
    device = clock.device
    with uvit_fusions_off(be.uvit_net):
        r[f"uvit_cfg_{tag}_unfused_ms"] = clock.ms(graphed(run_uvit, device), repeats=30)
    run_uvit = graphed(run_uvit, device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = graphed(lambda: be.uvit_net(*a), device)
    r[f"uvit_cfg_{tag}_flash_attention_ms"] = clock.ms(flash, repeats=30)
    decoder_off = decoder_without_fusions(be.vae_decoder)
    r[f"decoder_{tag}_torch_groupnorm_ms"] = clock.ms(lambda: decoder_off(latent()), repeats=10)
    return run_uvit


def measure_fp8_uvit(r: dict, be, a: tuple, clock: Clock, report: dict | None):
    """The fp8 UViT call into r (and its scales into report, when given); returns its output's function."""
    run_uvit = lambda: be.uvit(*a)
    if report is not None:
        report["fp8_scales"] = fp8_scale_report(be, run_uvit)
    r["uvit_cfg_fp8_ms"] = clock.ms(graphed(run_uvit, clock.device), repeats=30)
    return lambda: uvit_output(be, a)


def measure_compiled_uvit(r: dict, be, a: tuple, dtype_tag: str, clock: Clock) -> None:
    t1 = time.perf_counter()
    be.uvit(*a)
    sync(clock.device)
    r["compile_s"] = time.perf_counter() - t1
    r[f"uvit_cfg_{dtype_tag}_compiled_ms"] = clock.ms(graphed(lambda: be.uvit(*a), clock.device), repeats=30)
