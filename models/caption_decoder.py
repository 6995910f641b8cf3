"""Caption decoder of UniDiffuser (`libs/caption_decoder.py` in thu-ml/unidiffuser): the text
latent [B, 77, 64] -> `decode_prefix` (Linear 64 -> 768) -> GPT-2 124M on those 77 embeddings as
a prefix -> beam search -> token ids of one caption per item.

GPT-2 (Radford et al. 2019, the "gpt2" checkpoint fine-tuned by the UniDiffuser authors, with one
added token '<|EOS|>' = 50257 that ends a caption) is written out here, with a static-shape KV
cache, instead of running transformers: the original recomputes all positions of all 5 beams
for every token (~36 500 token positions for 67 tokens, ~400 with the cache). The original runs
it in fp32. Parameter names are those of `caption_decoder.pth` without
DataParallel's `module.` prefix: `decode_prefix.*`, `gpt.transformer.*` (Conv1D weights stored
[in, out]), `gpt.lm_head.weight` (tied to `wte`, as in GPT-2). The file's `encode_prefix.*`
belongs to models/text_encoder.py; `original_state_dict` picks this module's part.

`generate` is the original's `generate_beam` (beam 5, at most 67 tokens, scores = sums of
softmax().log(), finished beams frozen, beams ranked by score / length), batched: each of the B
searches is independent but all B*5 beams run as one batch. It runs as a fixed sequence of
device operations (no host sync except an optional "all finished?" check every few tokens, and
optionally as one replayed CUDA graph per token); a search whose beams have all finished is
frozen in place, which is exactly the original's early `break`. Beams that move between rows
keep their history by reference (models/decode_attention.py), so the cache itself never moves;
on the fast path (`fused`) each layer's attention and each residual add + LayerNorm are one
Triton kernel, and the choice of the next beams reads the logits without writing every score
(models/beam_topk.py).
tests/test_caption_decoder.py pins it to transformers' GPT2LMHeadModel, to the original algorithm
written out literally, and to diffusers' UniDiffuserTextDecoder.generate_beam.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import beam_topk, decode_attention, fused_norm
from .config import CaptionDecoderConfig
from .random_weights import randomize_


class Conv1D(nn.Module):
    """GPT-2's linear layer; the weight is stored [in, out] (the checkpoint's layout)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: CaptionDecoderConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return self.c_attn(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        B, H, L, hd = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, L, H * hd))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal attention over the whole sequence; also returns its keys and values."""
        q, k, v = self._qkv(x)
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True)), k, v

    def step(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ptr: torch.Tensor,
             pos: torch.Tensor, prefix: int, fused: bool) -> torch.Tensor:
        """One new token per row [N, D] at position `pos` ([1] long, on the device): its key and
        value go into the caches [N, H, T, hd], and it attends to its history through `ptr`
        (decode_attention.attend)."""
        return self.c_proj(decode_attention.attend(self.c_attn(x), k_cache, v_cache, ptr, pos, prefix,
                                                   self.n_head, fused))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: CaptionDecoderConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))   # GPT-2's "gelu_new"


class GPT2Block(nn.Module):
    def __init__(self, cfg: CaptionDecoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, k, v = self.attn(self.ln_1(x))
        x = x + h
        return x + self.mlp(self.ln_2(x)), k, v


class GPT2Model(nn.Module):
    def __init__(self, cfg: CaptionDecoderConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """inputs_embeds [B, L, D] at positions 0..L-1 -> final hidden states [B, L, D] and each
        layer's (keys, values) [B, H, L, hd]."""
        x = embeds + self.wpe.weight[: embeds.shape[1]]
        kvs = []
        for block in self.h:
            x, k, v = block(x)
            kvs.append((k, v))
        return self.ln_f(x), kvs

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             ptr: torch.Tensor, prefix: int, fused: bool = False) -> torch.Tensor:
        """tokens [N] at position pos -> final hidden state [N, D]; caches [n_layer, N, H, T, hd]
        and ptr as decode_attention.attend takes them. Each residual add is carried into the
        LayerNorm that follows it (one kernel for both where `fused`)."""
        x, r = self.wte(tokens), self.wpe(pos).expand(len(tokens), -1)
        for i, block in enumerate(self.h):
            x, y = _add_norm(block.ln_1, x, r, fused)
            r = block.attn.step(y, k_cache[i], v_cache[i], ptr, pos, prefix, fused)
            x, y = _add_norm(block.ln_2, x, r, fused)
            r = block.mlp(y)
        return _add_norm(self.ln_f, x, r, fused)[1]


def _add_norm(norm: nn.LayerNorm, x: torch.Tensor, r: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, norm(x + r)): a pre-LN residual stream and what the next layer reads."""
    if fused and fused_norm.available(x.device):
        return fused_norm.add_layer_norm(x, r, norm.weight, norm.bias, norm.eps, return_sum=True)
    s = x + r
    return s, norm(s)


class GPT2LMHead(nn.Module):
    """GPT2LMHeadModel's parameters: `transformer.*` and the tied `lm_head.weight`."""

    def __init__(self, cfg: CaptionDecoderConfig):
        super().__init__()
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        # A state dict saved without the duplicate (safetensors refuses shared tensors) still
        # loads strictly: the head is the embedding.
        self._register_load_state_dict_pre_hook(self._fill_tied_head)

    @staticmethod
    def _fill_tied_head(state, prefix, *args):
        head, wte = prefix + "lm_head.weight", prefix + "transformer.wte.weight"
        if head not in state and wte in state:
            state[head] = state[wte]


class _Beams:
    """Static-shape state of B beam searches with K beams each (N = B*K rows), updated in place by
    CaptionDecoder._step so that one captured CUDA graph can replay every token."""

    def __init__(self, cfg: CaptionDecoderConfig, B: int, device: torch.device, dtype: torch.dtype):
        K, S, P = cfg.beam_size, cfg.max_new_tokens, cfg.prefix_length
        T = P + S          # the prefix, then at most S - 1 generated tokens are fed back (one spare)
        hd = cfg.n_embd // cfg.n_head
        i64 = dict(device=device, dtype=torch.long)
        self.B, self.K, self.P = B, K, P
        self.k = torch.zeros(cfg.n_layer, B * K, cfg.n_head, T, hd, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.tokens = torch.zeros(B, K, S, **i64)          # generated ids, beam order of the last step
        self.last = torch.zeros(B * K, **i64)               # the token each row feeds next
        self.scores = torch.zeros(B, K, device=device)      # summed log-probabilities (fp32)
        self.lengths = torch.ones(B, K, device=device)      # tokens counted for the average, as floats
        self.stopped = torch.zeros(B, K, device=device, dtype=torch.bool)
        self.done = torch.zeros(B, device=device, dtype=torch.bool)   # every beam of the item stopped
        self.pos = torch.zeros(1, **i64)                    # position of the token fed next
        self.gen = torch.zeros(1, **i64)                    # its generated slot: pos - P
        self.ptr = torch.zeros(B * K, S, **i64)             # row holding each generated slot (decode_attention)
        self.own = torch.arange(B * K, **i64)[:, None]
        self.col = torch.zeros(1, **i64)                    # column of `tokens` written next
        self.row0 = torch.arange(B, **i64)[:, None] * K
        self.same = torch.arange(K, **i64).expand(B, K)
        # A finished beam's only continuation: token 0 at log-probability 0 (its score kept).
        self.frozen = torch.full((cfg.vocab_size,), float("-inf"), device=device)
        self.frozen[0] = 0.0


class CaptionDecoder(nn.Module):
    fused = False   # set on the fast path: decode attention and add + LayerNorm as Triton kernels

    def __init__(self, cfg: CaptionDecoderConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
        if cfg.prefix_length + cfg.max_new_tokens > cfg.n_positions:
            raise ValueError(f"prefix_length + max_new_tokens = {cfg.prefix_length + cfg.max_new_tokens} "
                             f"exceeds n_positions {cfg.n_positions}")
        self.cfg = cfg
        self.decode_prefix = nn.Linear(cfg.prefix_dim, cfg.n_embd)
        self.gpt = GPT2LMHead(cfg)
        self._graphs: dict = {}
        # Captured graphs read the parameters' memory: forget them when the parameters may have
        # moved (.to / .half / .cuda, or a load with assign=True).
        self.register_load_state_dict_post_hook(lambda module, keys: module._graphs.clear())

    def _apply(self, fn, *args, **kwargs):
        self._graphs = {}
        return super()._apply(fn, *args, **kwargs)

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """GPT2LMHeadModel(inputs_embeds=embeds).logits, no cache: [B, L, D] -> [B, L, vocab]."""
        h, _ = self.gpt.transformer(embeds)
        return self.gpt.lm_head(h)

    forward = logits

    def _fused(self, device: torch.device) -> bool:
        return self.fused and fused_norm.available(device)

    @torch.no_grad()
    def generate(self, text: torch.Tensor, check_every: int | None = None,
                 cuda_graph: bool = False) -> list[list[int]]:
        """Text latents [B, prefix_length, prefix_dim] -> for each item the best beam's token ids,
        up to and including '<|EOS|>' (all max_new_tokens ids if it never ended), which is what
        the original hands to `tokenizer.decode(..., skip_special_tokens=True)`.

        check_every: look whether every search has finished (one host sync) every this many
        tokens and stop early; None: every token on the CPU, every 8 on a GPU; 0: never (always
        max_new_tokens steps; same result, finished searches are frozen). cuda_graph: on CUDA,
        replay one captured graph per token (captured once per batch size, dtype and device)."""
        cfg = self.cfg
        B, P, _ = text.shape
        if P != cfg.prefix_length:
            raise ValueError(f"caption decoder expects {cfg.prefix_length} text tokens, got {P}")
        weight = self.decode_prefix.weight
        device, dtype = weight.device, weight.dtype
        graphed = cuda_graph and device.type == "cuda"
        if check_every is None:
            check_every = 8 if device.type == "cuda" else 1

        key = (B, dtype, device, self._fused(device))
        st, graph = self._graphs.get(key, (None, None)) if graphed else (None, None)
        if st is None:
            st = _Beams(cfg, B, device, dtype)
        self._start(st, text.to(device=device, dtype=dtype))

        steps, eager = cfg.max_new_tokens - 1, 0
        if graphed and graph is None:
            # Warm up on a side stream (real steps: the state advances), then capture one step.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(min(2, steps)):
                    self._step(st)
                    eager += 1
            torch.cuda.current_stream(device).wait_stream(side)
            if eager < steps:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step(st)
                self._graphs[key] = (st, graph)
        for i in range(eager, steps):
            if check_every and i % check_every == 0 and bool(st.done.all()):
                break
            if graph is not None:
                graph.replay()
            else:
                self._step(st)
        return self._best(st)

    def _start(self, st: _Beams, text: torch.Tensor) -> None:
        """Run the prefix once (B rows), copy its keys/values to each item's K beams, and take
        the first token: the K most likely, scores = their log-probabilities, lengths 1."""
        K, P = st.K, st.P
        h, kvs = self.gpt.transformer(self.decode_prefix(text))
        for i, (k, v) in enumerate(kvs):
            st.k[i, :, :, :P].copy_(k.repeat_interleave(K, dim=0))
            st.v[i, :, :, :P].copy_(v.repeat_interleave(K, dim=0))
        logp = self.gpt.lm_head(h[:, -1]).float().softmax(-1).log()
        scores, tok = logp.topk(K, dim=-1)
        st.tokens.zero_()
        st.tokens[:, :, 0] = tok
        st.last.copy_(tok.view(-1))
        st.scores.copy_(scores)
        st.lengths.fill_(1.0)
        st.stopped.copy_(tok == self.cfg.eos_token_id)
        st.done.copy_(st.stopped.all(-1))
        st.pos.fill_(P)
        st.gen.zero_()
        st.col.fill_(1)

    def _step(self, st: _Beams) -> None:
        """One token of every search, as the original's loop body (same operations in the same
        order, batched over items); items already `done` keep their state unchanged."""
        B, K, V = st.B, st.K, self.cfg.vocab_size
        fused = self._fused(st.k.device)
        st.ptr.index_copy_(1, st.gen, st.own)              # the token fed now: each row's own slot
        h = self.gpt.transformer.step(st.last, st.pos, st.k, st.v, st.ptr, st.P, fused)
        lengths = st.lengths + (~st.stopped).float()
        best, src, tok = beam_topk.best_continuations(self.gpt.lm_head(h).view(B, K, V), st.scores, lengths,
                                                      st.stopped, st.frozen, fused)
        done = st.done[:, None]
        src = torch.where(done, st.same, src)
        lengths = lengths.gather(1, src)
        st.scores.copy_(torch.where(done, st.scores, best * lengths))     # the original's avg * length
        st.lengths.copy_(torch.where(done, st.lengths, lengths))
        st.stopped.copy_(torch.where(done, st.stopped, st.stopped.gather(1, src) | (tok == self.cfg.eos_token_id)))
        tokens = st.tokens.gather(1, src[..., None].expand_as(st.tokens))
        tokens.scatter_(2, st.col.view(1, 1, 1).expand(B, K, 1), tok[..., None])
        st.tokens.copy_(torch.where(done[..., None], st.tokens, tokens))
        st.last.copy_(torch.where(done, st.last.view(B, K), tok).view(-1))
        # Beams moved to new rows take their history along: its pointers, not the cache. The
        # prefix part is the same for all K rows of an item.
        st.ptr.copy_(st.ptr.index_select(0, (st.row0 + src).view(-1)))
        st.done.copy_(st.stopped.all(-1))
        st.pos.add_(1)
        st.gen.add_(1)
        st.col.add_(1)

    @staticmethod
    def _best(st: _Beams) -> list[list[int]]:
        # The original ranks by scores / lengths with argsort(descending) and takes the first;
        # argmax takes the first of exactly equal maxima (argsort leaves their order open).
        best = (st.scores / st.lengths).argmax(-1)
        items = torch.arange(st.B, device=best.device)
        lengths = st.lengths[items, best].long().tolist()
        tokens = st.tokens[items, best].tolist()
        return [ids[:n] for ids, n in zip(tokens, lengths)]


# ---------------------------------------------------------------------------------------------
# Checkpoint layout, random stand-ins, text

_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def is_conv1d_weight(name: str) -> bool:
    """GPT-2's [in, out] matrices (for random_weights.randomize_'s fan-in)."""
    return name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def original_state_dict(caption: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`caption_decoder.pth` -> CaptionDecoder's state dict: DataParallel's `module.` prefix
    stripped; `encode_prefix.*` (the text encoder's), `clip*` keys (which the original's own
    loader also leaves unused) and GPT-2's constant attention buffers dropped. The file was
    written by transformers 4.23, whose GPT-2 saved `h.N.attn.bias` (the causal mask, checked
    here) and `h.N.attn.masked_bias` with the weights; the original loads with no missing key,
    so they are expected in the file, but they are not parameters."""
    out = {}
    for key, value in caption.items():
        key = key.removeprefix("module.")
        if key.startswith(("encode_prefix.", "clip")):
            continue
        if key.startswith("gpt.transformer.h.") and key.endswith(_GPT2_BUFFERS):
            if key.endswith(".attn.bias"):
                n = value.shape[-1]
                if not torch.equal(value.reshape(n, n).bool(), torch.ones(n, n, dtype=torch.bool).tril()):
                    raise ValueError(f"{key} is not GPT-2's causal mask")
            continue
        out[key] = value
    head, wte = "gpt.lm_head.weight", "gpt.transformer.wte.weight"
    if head in out and wte in out and not torch.equal(out[head], out[wte]):
        raise ValueError(f"{head} differs from {wte}: this decoder ties them, as GPT-2 does")
    return out


def random_original(cfg: CaptionDecoderConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights in `caption_decoder.pth`'s layout minus `module.encode_prefix.*` (the text
    encoder's random weights provide it): `module.decode_prefix.*`, `module.gpt.transformer.*`
    with transformers 4.23's attention buffers, and the tied `module.gpt.lm_head.weight` (a copy)."""
    model = randomize_(CaptionDecoder(cfg), generator, fan_in_first=is_conv1d_weight)
    out = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    n = cfg.n_positions
    mask = torch.ones(n, n, dtype=torch.uint8).tril().view(1, 1, n, n)
    for i in range(cfg.n_layer):
        out[f"module.gpt.transformer.h.{i}.attn.bias"] = mask.clone()
        out[f"module.gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def clean_up_tokenization(text: str) -> str:
    """The space clean-up transformers' decode applied by default up to 4.44 (the original ran
    4.23): no space before . ? ! , and English contractions. transformers 5 skips it for BPE
    tokenizers even when asked, so it is applied here."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def decode_captions(tokenizer, token_lists: Sequence[Sequence[int]]) -> list[str]:
    """Token ids from `generate` -> captions, as the original: the GPT-2 tokenizer (with
    '<|EOS|>' added) decodes with skip_special_tokens, then the space clean-up."""
    return [clean_up_tokenization(tokenizer.decode(list(ids), skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False))
            for ids in token_lists]
