"""Decode attention kernel: slots per iteration and warps, on the v1 caption decoder (B=1, 8)."""
import statistics, sys
sys.path.insert(0, ".")
import torch
from models import decode_attention as da
from models.caption_decoder import CaptionDecoder
from models.config import CaptionDecoderConfig
torch.manual_seed(0)
cfg = CaptionDecoderConfig()
dec = CaptionDecoder(cfg)
for p in dec.parameters():
    p.data.normal_(0, 0.02)
dec = dec.half().cuda().eval()
dec.fused = True
def timed(fn, n=15):
    for _ in range(3): fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
N, H, T, hd = 5, 12, 144, 64
qkv = torch.randn(N, 3 * H * hd, device="cuda", dtype=torch.half)
k = torch.randn(N, H, T, hd, device="cuda", dtype=torch.half); v = torch.randn_like(k)
ptr = torch.randint(0, N, (N, 67), device="cuda"); pos = torch.tensor([77 + 60], device="cuda")
ref = None
for bt, nw in ((64, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8)):
    da.BLOCK_T, da.NUM_WARPS = bt, nw
    out = da.attend(qkv, k, v, ptr, pos, 77, 12, fused=True)
    ref = out if ref is None else ref
    us = timed(lambda: [da.attend(qkv, k, v, ptr, pos, 77, 12, fused=True) for _ in range(100)]) * 10
    gens = []
    for B in (1, 8):
        text = torch.randn(B, 77, 64, device="cuda", dtype=torch.half)
        dec._graphs.clear()
        gens.append(timed(lambda: dec.generate(text, check_every=0, cuda_graph=True)))
    print(f"BLOCK_T={bt} warps={nw}: kernel {us:.2f} us/call (eager, N=5), max diff {(out - ref).abs().max().item():.1e}; "
          f"generate B=1 {gens[0]:.2f} ms, B=8 {gens[1]:.2f} ms", flush=True)
