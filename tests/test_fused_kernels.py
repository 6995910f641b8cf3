"""The fast path's fused kernels (models/fused_norm.py, models/fp8.py) and the fusions in the UViT.

The Triton kernels run on CUDA, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1` with triton installed); elsewhere those tests skip. The torch fallbacks,
the fp8 layers' arithmetic and the unchanged fp32 path are tested everywhere."""
import pytest
import torch
import torch.nn.functional as F

from models import fp8, fused_norm
from models.config import PRESETS
from models.uvit import SkipLinear, UViT
from unidiffuser import networks
from unidiffuser.weights import random_weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_REASON = "needs triton and a CUDA device, or TRITON_INTERPRET=1 on the CPU"
needs_kernel = pytest.mark.skipif(not fused_norm.available(DEVICE), reason=KERNEL_REASON)
pytestmark = pytest.mark.kernel     # on a GPU machine: pytest -m "gpu or kernel"


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def poisoned_empty_cache(numel):
    """Leave NaN in the allocator's cache so a kernel output that is not fully written shows."""
    if DEVICE == "cuda":
        torch.full((numel,), float("nan"), dtype=torch.float32, device="cuda")


def test_unfused_paths_are_the_original_ops():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g)
    norm = fused_norm.LayerNorm(32)
    torch.nn.init.normal_(norm.weight, generator=g)
    torch.nn.init.normal_(norm.bias, generator=g)
    assert torch.equal(norm(x, r), F.layer_norm(x + r, (32,), norm.weight, norm.bias))
    assert torch.equal(norm(x), F.layer_norm(x, (32,), norm.weight, norm.bias))
    lin = SkipLinear(64, 32)
    assert torch.equal(lin(x, r), F.linear(torch.cat([x, r], -1), lin.weight, lin.bias))


def test_split_skip_linear_matches_concatenation():
    g = torch.Generator().manual_seed(1)
    x, skip = torch.randn(2, 7, 48, generator=g), torch.randn(2, 7, 48, generator=g)
    lin = SkipLinear(96, 48)
    want = lin(x, skip)
    lin.split = True
    got = lin(x, skip)
    assert got.shape == want.shape
    assert rel_l2(got, want) < 1e-6
    assert list(dict(lin.named_parameters())) == ["weight", "bias"]


@pytest.mark.parametrize("n", [1536, 100])
@pytest.mark.parametrize("with_residual", [True, False])
@needs_kernel
def test_add_layer_norm_kernel(n, with_residual):
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator().manual_seed(n)
    x = (3 * torch.randn(2, 37, n, generator=g) + 1).to(DEVICE, dt)
    r = torch.randn(2, 37, n, generator=g).to(DEVICE, dt) if with_residual else None
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dt)
    b = (0.1 * torch.randn(n, generator=g)).to(DEVICE, dt)
    poisoned_empty_cache(x.numel())
    got = fused_norm.add_layer_norm(x, r, w, b)
    s = x.double() if r is None else x.double() + r.double()
    want = F.layer_norm(s, (n,), w.double(), b.double())
    unfused = F.layer_norm(x if r is None else x + r, (n,), w, b)
    assert got.dtype == dt and got.shape == x.shape and not got.isnan().any()
    # fp32 statistics: at least as close to the float64 reference as the unfused op
    assert rel_l2(got, want) <= max(1.1 * rel_l2(unfused, want), 1e-6)
    assert rel_l2(got, want) < (2e-3 if dt == torch.float16 else 1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_add_layer_norm_returns_the_sum(fused, monkeypatch):
    """The pre-LN form (caption decoder): (x + r, norm(x + r)), the sum in x's dtype."""
    if fused and not fused_norm.available(DEVICE):
        pytest.skip(KERNEL_REASON)
    device = DEVICE if fused else "cpu"
    dt = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(7)
    x, r = (torch.randn(5, 768, generator=g).to(device, dt) for _ in range(2))
    r = r[:1].expand(5, -1)                    # a broadcast residual (the position embedding)
    w, b = (1 + 0.1 * torch.randn(768, generator=g)).to(device, dt), (0.1 * torch.randn(768, generator=g)).to(device, dt)
    poisoned_empty_cache(2 * x.numel())
    if not fused:
        monkeypatch.setattr(fused_norm, "available", lambda device: False)
    s, y = fused_norm.add_layer_norm(x, r, w, b, return_sum=True)
    want_s = x.double() + r.double()
    want_y = F.layer_norm(want_s, (768,), w.double(), b.double())
    assert s.dtype == y.dtype == dt and s.shape == y.shape == x.shape
    assert rel_l2(s, want_s) < (1e-3 if dt == torch.float16 else 1e-7)
    assert rel_l2(y, want_y) < (2e-3 if dt == torch.float16 else 1e-6)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_quantize_rows(gelu, with_skip):
    """Kernel (where it runs) and fallback: row ~= q * scale to e4m3's precision, the largest
    |value| of each row maps to 448."""
    g = torch.Generator().manual_seed(2)
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    x = (torch.randn(33, 96, generator=g) * torch.logspace(-2, 2, 33)[:, None]).to(DEVICE, dt)
    skip = torch.randn(33, 64, generator=g).to(DEVICE, dt) if with_skip else None
    poisoned_empty_cache(33 * 160)
    q, scale = fp8.quantize_rows(x, skip, gelu)
    v = F.gelu(x.float()) if gelu else x.float()
    if with_skip:
        v = torch.cat([v, skip.float()], -1)
    assert q.dtype == torch.float8_e4m3fn and q.shape == v.shape and scale.shape == (33, 1)
    deq = q.float() * scale
    assert not deq.isnan().any()
    amax = v.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(scale, amax / 448, rtol=1e-5, atol=0)
    ok = (deq - v).abs() <= v.abs() / 16 + amax / 448 * 2 ** -9    # half a step of 3 mantissa bits
    if DEVICE == "cpu" and fused_norm.available("cpu"):
        # Triton's interpreter (3.9) converts fp32 -> e4m3 without carrying a round-up into the
        # exponent (124 -> 64, not 128): ~2% of values. The GPU's cvt.rn does not; CUDA runs check all.
        assert ok.float().mean() > 0.95
    else:
        assert ok.all()
    assert torch.allclose(q.float().abs().amax(-1), torch.full((33,), 448.0, device=DEVICE))


@pytest.fixture
def fp8_layer_math(monkeypatch):
    """On the CPU, the layers' arithmetic through the torch fallback even under Triton's
    interpreter (whose e4m3 rounding is off, see above)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(fp8, "available", lambda device: False)


def test_fp8_linear_close_to_linear(fp8_layer_math):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.normal_(0, 128 ** -0.5, generator=g)
        lin.bias.normal_(0, 0.1, generator=g)
    x = torch.randn(4, 10, 128, generator=g)
    f8 = fp8.Fp8Linear(lin)
    assert f8.weight.dtype == torch.float8_e4m3fn and f8.weight_scale.shape == (1, 64)
    got = f8(x)
    assert got.shape == (4, 10, 64)
    err = rel_l2(got, lin(x))
    # e4m3 keeps 3 mantissa bits: ~2.7% rms rounding error per operand, ~4% per GEMM on
    # Gaussian data; quantised (not a copy of the fp32 op), and no worse than that
    assert 1e-3 < err < 6e-2


@torch.no_grad()
def test_convert_uvit_to_fp8(fp8_layer_math):
    cfg = PRESETS["tiny"].uvit
    net = random_weights.randomize_(UViT(cfg), torch.Generator().manual_seed(4)).eval()
    g = torch.Generator().manual_seed(5)
    B = 2
    args = (torch.randn(B, cfg.in_chans, 8, 8, generator=g), torch.randn(B, 1, cfg.clip_img_dim, generator=g),
            torch.randn(B, cfg.num_text_tokens, cfg.text_dim, generator=g), torch.tensor([10.0, 900.0]),
            torch.tensor([0.0, 1000.0]), torch.ones(B, dtype=torch.long))
    want = net(*args)
    stats = fp8.convert_uvit(net, keep=())
    n_blocks = cfg.depth + 1
    assert len(stats) == 4 * n_blocks + cfg.depth // 2      # qkv, proj, fc1, fc2 + out-blocks' skip_linear
    assert all(0 < s["w_scale_min"] <= s["w_scale_median"] <= s["w_scale_max"] for s in stats.values())
    assert isinstance(net.decoder_pred, torch.nn.Linear) and isinstance(net.text_embed, torch.nn.Linear)
    amax = fp8.activation_amax(net, lambda: net(*args))
    assert set(amax) == set(stats) and all(a > 0 for a in amax.values())
    got = net(*args)
    for a, b in zip(got, want):   # ~4% per GEMM (see above), through 5 blocks of random weights
        assert 1e-3 < rel_l2(a, b) < 0.1


@torch.no_grad()
def test_convert_uvit_keeps_the_named_linears_in_16_bit(fp8_layer_math):
    """`keep` names linears (or whole blocks) that stay nn.Linear; an MLP split between fp8 and
    fp16 still computes fc2(gelu(fc1(x))), with the fast path's GEMM-epilogue GELU switched on."""
    from unidiffuser.backends.torch_backend import set_uvit_fusions
    cfg = PRESETS["tiny"].uvit
    net = random_weights.randomize_(UViT(cfg), torch.Generator().manual_seed(4)).eval()
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(2, cfg.in_chans, 8, 8, generator=g), torch.randn(2, 1, cfg.clip_img_dim, generator=g),
            torch.randn(2, cfg.num_text_tokens, cfg.text_dim, generator=g), torch.tensor([10.0, 900.0]),
            torch.tensor([0.0, 1000.0]), torch.ones(2, dtype=torch.long))
    want = net(*args)
    keep = ["in_blocks.0", "mid_block.mlp.fc1", "out_blocks.0.mlp.fc2", "out_blocks.1.skip_linear"]
    stats = fp8.convert_uvit(net, keep=keep)
    assert not any(n.startswith("in_blocks.0.") for n in stats)
    assert "mid_block.mlp.fc2" in stats and "mid_block.mlp.fc1" not in stats
    assert "out_blocks.0.mlp.fc1" in stats and "out_blocks.0.mlp.fc2" not in stats
    assert "out_blocks.1.skip_linear" not in stats and "out_blocks.0.skip_linear" in stats
    assert isinstance(net.in_blocks[0].attn.qkv, torch.nn.Linear)
    assert isinstance(net.mid_block.mlp.fc1, torch.nn.Linear) and isinstance(net.mid_block.mlp.fc2, fp8.Fp8Linear)
    set_uvit_fusions(net, on=True)    # the epilogue GELU is skipped where fc1 is fp8
    got = net(*args)
    for a, b in zip(got, want):
        assert 1e-4 < rel_l2(a, b) < 0.1


def test_fp8_needs_the_cuda_fast_path():
    """The rule lives in the front door (options.resolve), before any weights are read."""
    from unidiffuser import options
    with pytest.raises(ValueError, match="dtype fp8 needs backend torch on a CUDA GPU"):
        options.resolve(device="cpu", dtype="fp8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        options.resolve(device="cpu", dtype="int4")


def test_make_fast_leaves_cudnn_benchmark_alone():
    """It used to set torch.backends.cudnn.benchmark for the whole process (leaking into
    diffusers' VAE when benchmarked in the same process); the decoder no longer autotunes at all."""
    from unidiffuser.backends.torch_backend import make_fast
    cfg = PRESETS["tiny"]
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        make_fast(networks.build("uvit", cfg), networks.build("vae_decoder", cfg))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved
