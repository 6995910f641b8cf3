"""Caption decoder on the H200: where a token's time goes, torch ops against the fast path's Triton kernels (fused)."""
import statistics, sys, time, types
sys.path.insert(0, ".")
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from models.caption_decoder import CaptionDecoder, GPT2MLP, _Beams
from models.config import CaptionDecoderConfig

torch.manual_seed(0)
cfg = CaptionDecoderConfig()
dec = CaptionDecoder(cfg)
for p in dec.parameters():
    p.data.normal_(0, 0.02)
dec = dec.half().cuda().eval()
dev = torch.device("cuda")

def timed(fn, n=15):
    for _ in range(3): fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)

for fused in (False, True):
    dec.fused = fused
    dec._graphs.clear()
    print(f'--- fused={fused}')
    for B in (1, 8):
        text = torch.randn(B, 77, 64, device=dev, dtype=torch.half)
        ms = timed(lambda: dec.generate(text, check_every=0, cuda_graph=True))
        print(f"B={B} graphed generate: {ms:.2f} ms ({ms / 66 * 1000:.0f} us/token incl. prefix)", flush=True)
        # the prefix alone
        st = _Beams(cfg, B, dev, torch.half)
        print(f"B={B} prefix (_start): {timed(lambda: dec._start(st, text)):.3f} ms")
        print(f"B={B} eager _step: {timed(lambda: dec._step(st)):.3f} ms")
        with torch.no_grad():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5): dec._step(st)
                torch.cuda.synchronize()
        evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        tot = sum(e.self_device_time_total for e in evs) / 5
        cnt = sum(e.count for e in evs) / 5
        print(f"B={B} per step: {cnt:.0f} kernels, {tot:.0f} us kernel time")
        for e in sorted(evs, key=lambda e: -e.self_device_time_total)[:22]:
            print(f"   {e.self_device_time_total / 5:8.1f} us  x{e.count / 5:5.1f}  {e.key[:110]}")

for B in (1, 8):
    text = torch.randn(B, 77, 64, device=dev, dtype=torch.half, generator=torch.Generator(dev).manual_seed(B))
    out = {}
    for fused in (False, True):
        dec.fused = fused
        out[fused] = dec.generate(text, check_every=0, cuda_graph=True)
    print(f"B={B}: fused tokens equal the torch ops' for {sum(a == b for a, b in zip(out[False], out[True]))}/{B} items")
