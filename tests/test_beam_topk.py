"""Beam search's choice of the next beams (models/beam_topk.py): the fast path's kernels against
the original's softmax().log() + topk over every score."""
import pytest
import torch

from models import beam_topk, fused_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.kernel     # on a GPU machine: pytest -m "gpu or kernel"


def case(B=3, K=5, V=10_003, dtype=torch.float32, seed=0):
    """Several slices of a vocabulary that is not a multiple of the slice; one search with a
    finished beam, one with every beam finished."""
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(B, K, V, generator=g)).to(DEVICE, dtype)
    scores = -torch.rand(B, K, generator=g).to(DEVICE) * 10
    stopped = torch.zeros(B, K, dtype=torch.bool, device=DEVICE)
    stopped[1, 2] = True
    stopped[2] = True
    lengths = torch.randint(1, 20, (B, K), generator=g).float().to(DEVICE) + (~stopped).float()
    frozen = torch.full((V,), float("-inf"), device=DEVICE)
    frozen[0] = 0.0
    return logits, scores, lengths, stopped, frozen


def test_torch_path_is_the_original_ranking():
    logits, scores, lengths, stopped, frozen = case(V=50)
    avg, src, tok = beam_topk.best_continuations(logits, scores, lengths, stopped, frozen)
    B, K, V = logits.shape
    for b in range(B):
        everything = [((scores[b, k] + logits[b, k].float().softmax(-1).log()[v] if not stopped[b, k]
                        else (scores[b, k] if v == 0 else float("-inf"))) / lengths[b, k], k, v)
                      for k in range(K) for v in range(V)]
        want = sorted(everything, key=lambda e: -float(e[0]))[:K]
        assert [(int(src[b, i]), int(tok[b, i])) for i in range(K)] == [(k, v) for _, k, v in want]
        assert torch.allclose(avg[b], torch.tensor([float(a) for a, _, _ in want], device=DEVICE), equal_nan=True)


@pytest.mark.skipif(not fused_norm.available(DEVICE), reason="needs triton and a CUDA device, or TRITON_INTERPRET=1 on the CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_rank_as_the_original(dtype):
    logits, scores, lengths, stopped, frozen = case(dtype=dtype)
    want = beam_topk.best_continuations(logits, scores, lengths, stopped, frozen)
    got = beam_topk.best_continuations(logits, scores, lengths, stopped, frozen, fused=True)
    # The search with every beam finished has one finite continuation per beam (token 0); the
    # rest are ties at -inf in any order, and the decoder keeps such a search frozen anyway.
    for b in range(2):
        assert torch.equal(got[1][b], want[1][b]) and torch.equal(got[2][b], want[2][b]), b
        torch.testing.assert_close(got[0][b], want[0][b], rtol=1e-5, atol=1e-5)
    finite = torch.isfinite(want[0][2])
    assert torch.equal(got[2][2][finite], want[2][2][finite]) and torch.equal(got[1][2][finite], want[1][2][finite])
