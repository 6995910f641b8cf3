"""Caption decoder on the H200: where a token's time goes, and what a few variants give."""
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

# variant: bias+GELU in the GEMM epilogue (cuBLASLt, tanh GELU)
def mlp_fused(self, x):
    h = torch._addmm_activation(self.c_fc.bias, x.reshape(-1, x.shape[-1]), self.c_fc.weight, use_gelu=True)
    return self.c_proj(h.view(*x.shape[:-1], -1))
text = torch.randn(1, 77, 64, device=dev, dtype=torch.half)
ref = dec.generate(text, check_every=0)
x = torch.randn(5, 1, 768, device=dev, dtype=torch.half)
m = dec.gpt.transformer.h[0].mlp
print("gelu epilogue max abs diff on one MLP:", (mlp_fused(m, x) - m(x)).abs().max().item())
GPT2MLP.forward = mlp_fused
dec._graphs.clear()
ms = timed(lambda: dec.generate(text, check_every=0, cuda_graph=True))
print(f"B=1 graphed, GELU epilogue: {ms:.2f} ms; same tokens: {dec.generate(text, check_every=0) == ref}")
