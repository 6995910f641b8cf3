"""Attention through beam pointers (models/decode_attention.py) against attention over a cache
whose rows were physically reordered into each beam's history, in float64."""
import pytest
import torch
import torch.nn.functional as F

from models import decode_attention, fused_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.kernel     # on a GPU machine: pytest -m "gpu or kernel"


def case(N=10, H=12, hd=64, P=77, S=67, gen=30, dtype=torch.float32, device="cpu", seed=0):
    """Caches with a prefix and `gen` generated slots, random pointers to rows holding them, and
    the new token's qkv at slot P + gen."""
    g = torch.Generator().manual_seed(seed)
    T = P + S
    k = torch.randn(N, H, T, hd, generator=g)
    v = torch.randn(N, H, T, hd, generator=g)
    ptr = torch.randint(0, N, (N, S), generator=g)
    ptr[:, gen] = torch.arange(N)                      # the token fed now: each row's own slot
    qkv = torch.randn(N, 3 * H * hd, generator=g)
    pos = torch.tensor([P + gen])
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in (qkv, k, v, ptr, pos)]


def reference(qkv, k, v, ptr, pos, P, H):
    """Each row's history gathered slot by slot into a cache of its own, then plain attention."""
    qkv, k, v = qkv.double().cpu(), k.double().cpu().clone(), v.double().cpu().clone()
    ptr, pos = ptr.cpu(), int(pos)
    N, D = qkv.shape[0], qkv.shape[1] // 3
    hd = D // H
    q, kn, vn = qkv.view(N, 3, H, hd).unbind(1)
    k[:, :, pos], v[:, :, pos] = kn, vn
    hk, hv = k.clone(), v.clone()
    for n in range(N):
        for s in range(P, pos + 1):
            hk[n, :, s], hv[n, :, s] = k[ptr[n, s - P], :, s], v[ptr[n, s - P], :, s]
    out = F.scaled_dot_product_attention(q[:, :, None], hk[:, :, :pos + 1], hv[:, :, :pos + 1])
    return out.reshape(N, D), k, v


@pytest.mark.parametrize("gen", [0, 1, 30, 66])
def test_torch_path_follows_the_pointers(gen):
    qkv, k, v, ptr, pos = case(gen=gen)
    want, want_k, want_v = reference(qkv, k, v, ptr, pos, 77, 12)
    got = decode_attention.attend(qkv, k, v, ptr, pos, 77, 12)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(k.double(), want_k) and torch.equal(v.double(), want_v)   # written at pos, nothing else


@pytest.mark.skipif(not fused_norm.available(DEVICE), reason="needs triton and a CUDA device, or TRITON_INTERPRET=1 on the CPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("gen", [0, 1, 50, 66])
def test_kernel_against_float64(dtype, gen):
    """The Triton kernel: keys/values written at pos (and nowhere else), output against float64
    as close as the torch path at the same precision (its softmax is fp32 in both)."""
    qkv, k, v, ptr, pos = case(N=40, gen=gen, dtype=dtype, device=DEVICE)
    want, want_k, want_v = reference(qkv, k, v, ptr, pos, 77, 12)
    k2, v2 = k.clone(), v.clone()
    torch_out = decode_attention.attend(qkv, k2, v2, ptr, pos, 77, 12)
    got = decode_attention.attend(qkv, k, v, ptr, pos, 77, 12, fused=True)
    assert got.dtype == dtype and got.shape == want.shape and torch.isfinite(got).all()
    assert torch.equal(k.cpu().double(), want_k) and torch.equal(v.cpu().double(), want_v)
    err = (got.double().cpu() - want).abs().max().item()
    torch_err = (torch_out.double().cpu() - want).abs().max().item()
    print(f"decode attention {dtype} gen={gen}: max abs err {err:.2e} (torch path {torch_err:.2e})")
    assert err <= max(2 * torch_err, 1e-5 if dtype == torch.float32 else 2e-3)
