"""models/caption_decoder.py on identical random weights, fp32 on the CPU:

(a) GPT-2 logits, without and with the KV cache, against transformers' GPT2LMHeadModel (eager);
(b) the batched KV-cache beam search against the original's `generate_beam` written out below
    literally (whole sequence recomputed every token, one item at a time, transformers' GPT-2);
(c) the same against diffusers' UniDiffuserTextDecoder.generate_captions (its port of it).

Ties. Our search and the references compute the same log-probabilities in different orders
(cached vs recomputed GEMMs, batched vs one item), so they agree to fp32 rounding, not bit for
bit. A beam search decision can only flip where two candidates are within that rounding, so
tokens must be identical except at such a tie, detected like this: the literal reference records
every step's candidate scores (score sum / length of each beam x next token) and the K-th best
(the selection boundary). A sequence that is not the reference's answer is walked through that
record to the first step where its prefix is not among the reference's beams; the gap
`boundary - its candidate score there` (or, if it is one of the final beams, `best final score -
its final score`) must be <= TIE_ULPS units in the last place of fp32 at that magnitude.
Anything else fails. The tests print how many ties occurred (normally none).

Random weights: GPT-2 with tied embeddings and random weights mostly repeats its input token, so
the test model scales wte down (x 0.2, logits restored by ln_f x 10) and makes '<|EOS|>' likely
(its row x 5): the searches then mix beams that stop at different lengths, searches that finish
early (all beams stopped: the frozen state) and searches that run all 67 tokens.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import pytest
import torch

from models.caption_decoder import (CaptionDecoder, clean_up_tokenization, decode_captions, original_state_dict,
                                    random_original)
from models import fused_norm
from models.config import PRESETS, CaptionDecoderConfig

TINY = PRESETS["tiny"].caption_decoder
V1 = PRESETS["v1"].caption_decoder
# A small vocabulary keeps the literal (quadratic) references fast; EOS is its last id.
SEARCH = dataclasses.replace(TINY, vocab_size=96, eos_token_id=95, n_positions=160)
TIE_ULPS = 64
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The searches are hundreds of tiny kernels: one intra-op thread is faster than two on the
    2-core CI and does not stall when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).norm() / theirs.norm()).item()


def searchable_state(cfg: CaptionDecoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """random_original's weights (our names), adjusted for non-degenerate beams (module doc)."""
    sd = original_state_dict(random_original(cfg, torch.Generator().manual_seed(seed)))
    wte = sd["gpt.transformer.wte.weight"] * 0.2
    wte[cfg.eos_token_id] *= 5
    sd["gpt.transformer.wte.weight"] = sd["gpt.lm_head.weight"] = wte
    sd["gpt.transformer.ln_f.weight"] = sd["gpt.transformer.ln_f.weight"] * 10
    return sd


def make_decoder(cfg: CaptionDecoderConfig = SEARCH, seed: int = 0) -> CaptionDecoder:
    model = CaptionDecoder(cfg).eval()
    model.load_state_dict(searchable_state(cfg, seed), strict=True)
    return model


def hf_gpt2(ours: CaptionDecoder):
    """transformers' GPT2LMHeadModel (eager attention) holding our gpt.* weights, loaded strictly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = ours.cfg
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=c.layer_norm_epsilon, bos_token_id=c.eos_token_id,
                        eos_token_id=c.eos_token_id)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    state = {k[len("gpt."):]: v for k, v in ours.state_dict().items() if k.startswith("gpt.")}
    model.load_state_dict(state, strict=True)
    return model


def text_latents(n: int, seed: int = 1, cfg: CaptionDecoderConfig = SEARCH) -> torch.Tensor:
    return torch.randn(n, cfg.prefix_length, cfg.prefix_dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# (a) GPT-2 itself

@torch.no_grad()
def test_logits_match_transformers_gpt2():
    """Full-sequence logits on inputs_embeds (decode_prefix of a text latent, then token
    embeddings), against GPT2LMHeadModel(inputs_embeds=...).logits."""
    ours = make_decoder()
    oracle = hf_gpt2(ours)
    prefix = ours.decode_prefix(text_latents(2))
    toks = torch.randint(0, SEARCH.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    embeds = torch.cat([prefix, ours.gpt.transformer.wte(toks)], dim=1)
    want = oracle(inputs_embeds=embeds).logits
    err = rel_err(ours.logits(embeds), want)
    print(f"gpt2 logits: rel_err={err:.3e}")
    assert err <= 1e-5


@torch.no_grad()
def test_kv_cache_steps_match_transformers_gpt2():
    """The decode path: the prefix once, then one token at a time through the static cache
    (what generate runs), against transformers recomputing the whole sequence. Also measures the
    log-probability differences that the tie tolerance must cover."""
    ours = make_decoder()
    oracle = hf_gpt2(ours)
    c = ours.cfg
    B, m, P = 3, 20, c.prefix_length
    prefix = ours.decode_prefix(text_latents(B))
    toks = torch.randint(0, c.vocab_size, (B, m), generator=torch.Generator().manual_seed(3))
    want = oracle(inputs_embeds=torch.cat([prefix, ours.gpt.transformer.wte(toks)], dim=1)).logits

    gpt = ours.gpt.transformer
    h, kvs = gpt(prefix)
    T = P + m
    k = torch.zeros(c.n_layer, B, c.n_head, T, c.n_embd // c.n_head)
    v = torch.zeros_like(k)
    for i, (ki, vi) in enumerate(kvs):
        k[i, :, :, :P], v[i, :, :, :P] = ki, vi
    got = [ours.gpt.lm_head(h[:, -1])]
    for j in range(m):
        pos = torch.tensor([P + j])
        own = torch.arange(B)[:, None].expand(B, m).contiguous()   # no beams: every slot is the row's own
        got.append(ours.gpt.lm_head(gpt.step(toks[:, j], pos, k, v, own, P)))
    got = torch.stack(got, dim=1)
    ref = want[:, P - 1:]
    err = rel_err(got, ref)
    logp, ref_logp = got.softmax(-1).log(), ref.softmax(-1).log()
    ulps = ((logp - ref_logp).abs() / (EPS32 * ref_logp.abs().clamp(min=1))).max().item()
    print(f"gpt2 cached steps: rel_err={err:.3e}, max |d log p| = {ulps:.1f} ulps of |log p|")
    assert err <= 1e-5
    # A tie compares two averaged scores, each off by at most about this many ulps of its
    # magnitude (an average of log-probabilities carries their relative error): the tolerance
    # TIE_ULPS covers twice the measured amount.
    assert ulps <= TIE_ULPS / 2


# --------------------------------------------------------------------------------------------
# the literal reference and the tie check

@dataclass
class Step:
    parents: list[tuple[int, ...]]    # beams before the step ([()] at the first)
    cand: torch.Tensor                # [len(parents), V] candidate scores the top-k ranks
    boundary: float                   # the K-th best candidate (the last one kept)
    margin: float                     # K-th best minus (K+1)-th best
    beams: list[tuple[int, ...]]      # beams after the step (tokens as the original keeps them)


@dataclass
class Reference:
    best: list[int]
    steps: list[Step]
    final: torch.Tensor               # scores / lengths of the last beams
    lengths: torch.Tensor


@torch.no_grad()
def reference_generate_beam(gpt, embed: torch.Tensor, eos: int, beam_size: int = 5,
                            entry_length: int = 67) -> Reference:
    """libs/caption_decoder.py `generate_beam` for one item (embed [1, L, D] = decode_prefix of
    its latent), step for step: the whole sequence through GPT-2 every token, softmax().log(),
    finished beams get -inf except token 0 at 0, lengths of unfinished beams + 1, top-k of
    sum / length over all beams x tokens, scores = average * length, stop when all finished;
    answer: the first by scores / lengths, cut at its length. Records each step for ties."""
    wte = gpt.transformer.wte
    tokens = scores = None
    seq_lengths = torch.ones(beam_size, device=embed.device)
    is_stopped = torch.zeros(beam_size, device=embed.device, dtype=torch.bool)
    generated = embed
    steps = []
    for _ in range(entry_length):
        logits = gpt(inputs_embeds=generated).logits[:, -1, :]
        logits = logits.softmax(-1).log()
        if scores is None:
            parents, cand = [()], logits.clone()
            top6 = logits[0].topk(beam_size + 1)[0]
            scores, next_tokens = logits.topk(beam_size, -1)
            boundary, margin = scores[0, -1].item(), (top6[-2] - top6[-1]).item()
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            parents = [tuple(t) for t in tokens.tolist()]
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            average = scores_sum / seq_lengths[:, None]
            cand = average.clone()
            top6 = average.view(-1).topk(beam_size + 1, -1)[0]
            average, next_tokens = average.view(-1).topk(beam_size, -1)
            boundary, margin = average[-1].item(), (top6[-2] - top6[-1]).item()
            source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = average * seq_lengths
            is_stopped = is_stopped[source]
        steps.append(Step(parents, cand.cpu(), boundary, margin, [tuple(t) for t in tokens.tolist()]))
        generated = torch.cat((generated, wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)), dim=1)
        is_stopped = is_stopped + next_tokens.eq(eos).squeeze()
        if is_stopped.all():
            break
    final = scores / seq_lengths
    first = final.argsort(descending=True)[0]
    return Reference(tokens[first, : int(seq_lengths[first])].tolist(), steps, final.cpu(), seq_lengths.cpu())


def tie_tol(value: float) -> float:
    return TIE_ULPS * EPS32 * max(1.0, abs(value))


def explain_difference(seq: list[int], ref: Reference) -> tuple[str, float, float]:
    """Where `seq` leaves the reference's search: ("step t", gap, tolerance) at the first step
    whose kept beams do not contain its prefix (finished beams continue with token 0, as in the
    original), or ("final", gap, tolerance) if it is one of the reference's final beams."""
    T = len(ref.steps)
    padded = list(seq) + [0] * max(0, T - len(seq))
    for t in range(1, min(len(padded), T) + 1):
        step = ref.steps[t - 1]
        prefix = tuple(padded[:t])
        if prefix not in step.beams:
            score = step.cand[step.parents.index(prefix[:-1]), prefix[-1]].item()
            return f"step {t}", step.boundary - score, tie_tol(step.boundary)
    j = step.beams.index(tuple(padded[:T]))
    best = ref.final.max().item()
    return "final", best - ref.final[j].item(), tie_tol(best)


def assert_same_or_tie(name: str, got: list[list[int]], refs: list[Reference]) -> int:
    """Identical token lists, or a difference explained by a tie (module doc); returns the ties."""
    ties = 0
    for b, (seq, ref) in enumerate(zip(got, refs)):
        if seq == ref.best:
            continue
        where, gap, tol = explain_difference(seq, ref)
        assert gap <= tol, (f"{name}, item {b}: tokens differ from the reference at {where} with a score gap of "
                            f"{gap:.3e} > tie tolerance {tol:.1e}\n  got {seq}\n  ref {ref.best}")
        ties += 1
        print(f"{name}, item {b}: tie at {where} (gap {gap:.2e} <= {tol:.1e})")
    print(f"{name}: {len(got) - ties}/{len(got)} identical, {ties} ties")
    return ties


@pytest.fixture(scope="module")
def searches():
    """Six items of one model: our batched search and the literal reference of each item."""
    ours = make_decoder()
    gpt = hf_gpt2(ours)
    text = text_latents(6)
    with torch.no_grad():
        refs = [reference_generate_beam(gpt, ours.decode_prefix(text[b: b + 1]), SEARCH.eos_token_id)
                for b in range(len(text))]
    return ours, text, refs


def test_references_are_not_degenerate(searches):
    """The test model's searches differ per item, use many tokens, and cover early finishes
    (every beam stopped before 67), a search running all 67 tokens, and finished beams kept
    while others go on."""
    _, _, refs = searches
    bests = [tuple(r.best) for r in refs]
    assert len(set(bests)) == len(bests)
    assert all(len(set(b)) >= 2 for b in bests) and len(set().union(*bests)) >= 8
    assert any(len(r.steps) < SEARCH.max_new_tokens for r in refs)
    assert any(len(r.steps) == SEARCH.max_new_tokens for r in refs)
    assert any(len(set(r.lengths.tolist())) > 1 for r in refs)
    margins = [(s.margin, tie_tol(s.boundary)) for r in refs for s in r.steps]
    close = sum(m <= tol for m, tol in margins)
    print(f"selection margins: min {min(m for m, _ in margins):.2e}, median {sorted(margins)[len(margins) // 2][0]:.2e}; "
          f"{close} of {len(margins)} steps within the tie tolerance")


def test_tie_check_rejects_real_differences(searches):
    """The tie check itself: another final beam of the reference, or a first token the reference
    did not keep, is a difference with a clear gap, not a tie."""
    _, _, refs = searches
    ref = next(r for r in refs if len(set(r.final.tolist())) == len(r.final))
    second = ref.final.argsort(descending=True)[1]
    seq = list(ref.steps[-1].beams[second][: int(ref.lengths[second])])
    where, gap, tol = explain_difference(seq, ref)
    assert where == "final" and gap > tol
    first = ref.steps[0]
    sixth = first.cand[0].topk(SEARCH.beam_size + 1)[1][-1].item()
    where, gap, tol = explain_difference([sixth] + ref.best[1:], ref)
    assert where == "step 1" and gap == pytest.approx(first.margin) and gap > tol
    with pytest.raises(AssertionError, match="differ from the reference at step 1"):
        assert_same_or_tie("meta", [[sixth] + ref.best[1:]], [ref])


def test_beam_search_matches_literal_reference(searches):
    """(b) generate on all items at once (B*5 rows, KV cache) against the original's algorithm
    run item by item."""
    ours, text, refs = searches
    t0 = time.perf_counter()
    got = ours.generate(text)
    print(f"generate B={len(text)}: {time.perf_counter() - t0:.3f} s")
    assert_same_or_tie("kv-cache beam search vs literal", got, refs)


def test_beam_search_matches_diffusers_generate_beam(searches):
    """(c) diffusers' UniDiffuserTextDecoder (decode_prefix, then generate_beam for each item) with
    the same weights; both it and ours are checked against the literal reference's record."""
    pytest.importorskip("diffusers", reason="diffusers is the test-only oracle (requirements-dev.txt)")
    from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder

    ours, text, refs = searches
    c = ours.cfg
    dec = UniDiffuserTextDecoder(prefix_length=c.prefix_length, prefix_inner_dim=c.n_embd, prefix_hidden_dim=c.prefix_dim,
                                 vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
                                 n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon).eval()
    state = {k.replace("gpt.", "transformer.", 1): v for k, v in ours.state_dict().items()}
    state["encode_prefix.weight"] = dec.encode_prefix.weight       # unused by decoding
    state["encode_prefix.bias"] = dec.encode_prefix.bias
    dec.load_state_dict(state, strict=True)
    theirs = []
    with torch.no_grad():
        # generate_captions' loop body: its final torch.stack needs equal lengths across items,
        # which searches that stop at different steps do not have.
        for b in range(len(text)):
            tokens, lengths = dec.generate_beam(input_embeds=dec.decode_prefix(text[b: b + 1]), device="cpu",
                                                eos_token_id=c.eos_token_id)
            theirs.append(tokens[0, : int(lengths[0])].tolist())
    assert_same_or_tie("diffusers generate_beam vs literal", theirs, refs)
    assert_same_or_tie("kv-cache beam search vs literal (diffusers run)", ours.generate(text), refs)


def test_batching_and_early_exit_do_not_change_results(searches):
    """Each item's search is independent of the batch (one item alone: same tokens, or a tie);
    checking for "all finished" every token, every 8 or never gives identical tokens (finished
    searches are frozen, which is what the original's break does)."""
    ours, text, refs = searches
    every = ours.generate(text, check_every=1)
    assert ours.generate(text, check_every=0) == every
    assert ours.generate(text, check_every=8) == every
    assert ours.generate(text, cuda_graph=True) == every        # a no-op off CUDA
    alone = [ours.generate(text[b: b + 1])[0] for b in range(len(text))]
    assert_same_or_tie("one item at a time vs literal", alone, refs)


@pytest.mark.kernel
@pytest.mark.skipif(not fused_norm.available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="needs triton and a CUDA device, or TRITON_INTERPRET=1 on the CPU")
def test_fused_kernels_give_the_same_search(searches):
    """The fast path's Triton kernels (decode attention through beam pointers, add + LayerNorm,
    the next beams' choice) in fp32: the literal reference's tokens (or a tie: the choice takes
    log(softmax) as x - logsumexp), eagerly and replayed as a graph."""
    ours, text, refs = searches
    model = make_decoder(SEARCH).to("cuda" if torch.cuda.is_available() else "cpu")
    model.fused = True
    got = model.generate(text.to(model.decode_prefix.weight.device))
    assert_same_or_tie("fused kernels vs literal", got, refs)
    assert model.generate(text.to(model.decode_prefix.weight.device), cuda_graph=True) == got


def test_output_ends_at_eos_or_runs_full_length(searches):
    ours, text, _ = searches
    for seq in ours.generate(text):
        assert (seq[-1] == SEARCH.eos_token_id and SEARCH.eos_token_id not in seq[:-1]) or \
            (len(seq) == SEARCH.max_new_tokens and SEARCH.eos_token_id not in seq)


# --------------------------------------------------------------------------------------------
# checkpoint layout, text

def test_v1_names_and_shapes_are_the_originals():
    """ClipCaptionModel = encode_prefix, decode_prefix and gpt = GPT2LMHeadModel (vocabulary
    resized to 50258); caption_decoder.pth holds its state dict under DataParallel's `module.`.
    Our names and shapes equal `gpt.` + transformers' GPT2LMHeadModel state (on the meta device)
    plus decode_prefix [768, 64]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in CaptionDecoder(V1).state_dict().items()}
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=50258)).state_dict()
    want = {f"gpt.{k}": tuple(v.shape) for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    want.update({"decode_prefix.weight": (768, 64), "decode_prefix.bias": (768,)})
    assert ours == want
    assert ours["gpt.transformer.h.0.attn.c_attn.weight"] == (768, 2304)        # Conv1D: [in, out]


def test_original_state_dict_from_caption_decoder_file():
    """From the file's layout: `module.` stripped, encode_prefix.* (the text encoder's), clip*
    keys and transformers 4.23's attn.bias / attn.masked_bias buffers dropped; the rest loads
    strictly. Also without the duplicate lm_head.weight (as a safetensors file would be)."""
    g = torch.Generator().manual_seed(0)
    raw = random_original(TINY, g)
    assert all(k.startswith(("module.decode_prefix.", "module.gpt.")) for k in raw)
    assert "module.gpt.lm_head.weight" in raw and "module.gpt.transformer.h.1.attn.masked_bias" in raw
    raw = {**raw, "module.encode_prefix.weight": torch.zeros(8, 32), "module.encode_prefix.bias": torch.zeros(8),
           "module.clip_model.x": torch.zeros(1)}
    sd = original_state_dict(raw)
    assert not any(k.startswith(("encode_prefix", "clip", "module.")) for k in sd)
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in sd)
    model = CaptionDecoder(TINY)
    model.load_state_dict(sd, strict=True)
    assert model.gpt.lm_head.weight is model.gpt.transformer.wte.weight
    without_head = {k: v for k, v in sd.items() if k != "gpt.lm_head.weight"}
    CaptionDecoder(TINY).load_state_dict(without_head, strict=True)

    bad_mask = dict(raw)
    bad_mask["module.gpt.transformer.h.0.attn.bias"] = torch.ones(1, 1, TINY.n_positions, TINY.n_positions)
    with pytest.raises(ValueError, match="causal mask"):
        original_state_dict(bad_mask)
    untied = dict(raw)
    untied["module.gpt.lm_head.weight"] = raw["module.gpt.lm_head.weight"] + 1
    with pytest.raises(ValueError, match="ties"):
        original_state_dict(untied)


def test_random_original_tiny_runs_and_is_seeded():
    a = random_original(TINY, torch.Generator().manual_seed(4))
    b = random_original(TINY, torch.Generator().manual_seed(4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = CaptionDecoder(TINY).eval()
    model.load_state_dict(original_state_dict(a), strict=True)
    out = model.generate(text_latents(2, cfg=TINY), check_every=0)
    assert len(out) == 2 and all(1 <= len(s) <= TINY.max_new_tokens for s in out)


def test_rejects_bad_shapes_and_configs():
    with pytest.raises(ValueError, match="77 text tokens"):
        make_decoder().generate(torch.zeros(1, 10, SEARCH.prefix_dim))
    with pytest.raises(ValueError, match="n_positions"):
        CaptionDecoder(dataclasses.replace(TINY, n_positions=100))


def test_decode_captions_as_the_original(tmp_path):
    """A GPT-2 tokenizer from a hand-made vocabulary with '<|EOS|>' added, as the original's:
    special tokens skipped, and the space clean-up of transformers 4.x's decode applied on every
    transformers version ("cat ." -> "cat."; 5.x would not do it for a BPE tokenizer)."""
    from transformers import GPT2Tokenizer

    vocab = {"a": 0, "\u0120cat": 1, "\u0120.": 2, "<|endoftext|>": 3, "\u0120,": 4, "\u0120a": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tok.add_special_tokens({"eos_token": "<|EOS|>"})
    eos = tok.convert_tokens_to_ids("<|EOS|>")
    assert eos == 6
    assert decode_captions(tok, [[0, 1, 4, 5, 1, 2, eos], [3, 0, 1]]) == ["a cat, a cat.", "a cat"]
    assert clean_up_tokenization("it is n't a cat 's toy , is it ?") == "it isn't a cat's toy, is it?"


# --------------------------------------------------------------------------------------------
# GPU


@pytest.fixture
def real_fp32():
    """The fp32 references on CUDA without TF32 (cuDNN's convolutions default to it)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

def _cuda_decoder(cfg, dtype, seed=0):
    return make_decoder(cfg, seed).cuda().to(dtype)


@pytest.mark.gpu
@torch.no_grad()
def test_fp16_logits_cuda(real_fp32):
    """v1 size on CUDA: fp16 logits against fp32 on the same inputs."""
    ref, half = _cuda_decoder(V1, torch.float32), _cuda_decoder(V1, torch.float16)
    text = text_latents(2, cfg=V1).cuda()
    toks = torch.randint(0, V1.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3)).cuda()

    def logits(model):
        prefix = model.decode_prefix(text.to(model.decode_prefix.weight.dtype))
        return model.logits(torch.cat([prefix, model.gpt.transformer.wte(toks)], dim=1)).float()

    want, got = logits(ref), logits(half)
    err = rel_err(got, want)
    dlogp = (got.log_softmax(-1) - want.log_softmax(-1)).abs().max().item()
    print(f"caption decoder fp16 logits: rel_err={err:.3e}, max_abs={(got - want).abs().max().item():.3e}, "
          f"max |d log p|={dlogp:.3e}")
    assert torch.isfinite(got).all() and err < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@torch.no_grad()
def test_fp16_beam_search_cuda_matches_fp32(real_fp32, fused):
    """Tokens of the fp16 search (torch ops, or the fast path's Triton kernels) against the
    literal fp32 reference on CUDA; differences must be ties at fp16's resolution: the tolerance
    is 4x the largest fp16-vs-fp32 difference of the log-probabilities that make up the scores
    (each next token of the fp32 reference's own sequences, teacher-forced)."""
    ref_model = _cuda_decoder(SEARCH, torch.float32)
    half = _cuda_decoder(SEARCH, torch.float16)
    half.fused = fused
    gpt = hf_gpt2(make_decoder(SEARCH)).cuda()
    text = text_latents(8).cuda()
    refs = [reference_generate_beam(gpt, ref_model.decode_prefix(text[b: b + 1]), SEARCH.eos_token_id)
            for b in range(len(text))]
    dlogp = 0.0
    for b, r in enumerate(refs):
        ids = torch.tensor(r.best, device="cuda")[None]
        lp = []
        for m in (ref_model, half):
            prefix = m.decode_prefix(text[b: b + 1].to(m.decode_prefix.weight.dtype))
            logp = m.logits(torch.cat([prefix, m.gpt.transformer.wte(ids)], 1)).float().log_softmax(-1)
            # position P - 1 + j predicts token j
            lp.append(logp[0, SEARCH.prefix_length - 1: -1].gather(1, ids[0, :, None]))
        dlogp = max(dlogp, (lp[0] - lp[1]).abs().max().item())
    tol = 4 * dlogp
    got16 = half.generate(text, cuda_graph=fused)
    assert_same_or_tie("fp32 cached", ref_model.generate(text), refs)
    ties = 0
    for b, (seq, r) in enumerate(zip(got16, refs)):
        if seq != r.best:
            where, gap, _ = explain_difference(seq, r)
            assert gap <= tol, f"item {b}: fp16 leaves the fp32 search at {where}, gap {gap:.3e} > {tol:.3e}"
            ties += 1
    print(f"fp16 beam search ({'fused' if fused else 'torch'}): {len(refs) - ties}/{len(refs)} identical to fp32, "
          f"{ties} ties (tol {tol:.2e})")


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_replay_equals_eager(real_fp32):
    """The captured-graph loop runs the same kernels: identical tokens to the eager loop, for a
    fresh capture, a reused one (second call, new inputs) and another batch size."""
    for dtype, fused in ((torch.float16, False), (torch.float16, True), (torch.float32, False), (torch.float32, True)):
        model = _cuda_decoder(SEARCH, dtype)
        model.fused = fused
        for B, seed in ((4, 1), (4, 2), (1, 3)):
            text = text_latents(B, seed).cuda()
            assert model.generate(text, cuda_graph=True) == model.generate(text), (dtype, fused, B, seed)
        assert len(model._graphs) == 2
        model.float()
        assert not model._graphs


@pytest.mark.gpu
@torch.no_grad()
def test_v1_speed_report(real_fp32):
    """Not a check: time of one v1-size batch of 8 (67 tokens, fp16), eager and graphed."""
    model = make_decoder(V1).cuda().half()
    model.fused = True
    text = text_latents(8, cfg=V1).cuda()
    for graph in (False, True, True):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(text, check_every=0, cuda_graph=graph)
        torch.cuda.synchronize()
        print(f"v1 caption decoder B=8 fp16 cuda_graph={graph}: {time.perf_counter() - t0:.3f} s, "
              f"lengths {[len(s) for s in out]}")
