"""A single-file Llama-family transformer with a static KV cache.

Covers Llama-2/3/3.1/3.2, CodeLlama, Mistral, TinyLlama, the TinyStories models, Qwen2/2.5 and Qwen3:
GQA, RMSNorm, SwiGLU, RoPE with `rope_theta` and llama3-style frequency scaling, Mistral's sliding window,
Qwen2's Q/K/V biases and Qwen3's per-head Q/K norms (switches in ModelArgs, read from the checkpoint's config).
Weights use Meta's interleaved RoPE layout (as gpt-fast does); the HF converter permutes Q/K.

This file is the architecture and nothing else: it imports torch and the config. What makes it fast on a given
machine is swapped in from outside after loading, as quantization swaps nn.Linear for Int8Linear: CPU matmul kernels
and a compiled-CPU attention (llama_fast/cpu), the serving engine's paged KV cache (llama_fast/serving).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model_config import ModelArgs


class KVCache(nn.Module):
    """Preallocated (batch, n_kv_heads, cache_len, head_dim) keys and values, written in place so every
    decode step sees the same shapes and compiles to one graph."""

    def __init__(self, max_batch_size, cache_len, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, cache_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # k, v: (B, n_kv_heads, T, head_dim) written at cache positions input_pos (T,)
        self.k_cache[: k.shape[0], :, input_pos] = k
        self.v_cache[: v.shape[0], :, input_pos] = v
        return self.k_cache[: k.shape[0]], self.v_cache[: v.shape[0]]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, mask: Tensor) -> Tensor:
        """The new keys and values k, v written at input_pos, then q's attention over the whole cache. A cache
        with a faster way to read itself overrides this (llama_fast/cpu, llama_fast/serving)."""
        k, v = self.update(input_pos, k, v)
        return attention(q, k, v, mask)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """SDPA for grouped queries: q (B, n_kv_heads, n_rep * T, head_dim) holds the n_rep query heads that share a KV
    head as rows, so k and v (B, n_kv_heads, S, head_dim) are never copied per query head; mask (B, 1, T, S)."""
    n_rep = q.shape[2] // mask.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, n_rep, 1) if n_rep > 1 else mask)


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("freqs_cis", None, persistent=False)
        # the KV cache's shape; config.max_seq_len is the context the model was trained for, cache_len <= it
        self.max_batch_size = self.cache_len = 0
        self.kv_cache_class = KVCache  # llama_fast.cpu swaps in a subclass that reads the cache its own way

    def setup_caches(self, max_batch_size: int, cache_len: int):
        """Allocate KV caches and the RoPE table for up to max_batch_size sequences of cache_len tokens."""
        if cache_len > self.config.max_seq_len:
            raise ValueError(f"{cache_len} tokens exceed the model's context of {self.config.max_seq_len}")
        if (max_batch_size, cache_len) == (self.max_batch_size, self.cache_len):
            return
        dtype, device = self.cache_dtype(), self.tok_embeddings.weight.device
        for layer in self.layers:  # the layer's own head count: under tensor parallelism, its local heads
            layer.attention.kv_cache = self.kv_cache_class(max_batch_size, cache_len, layer.attention.n_kv_heads,
                                                           self.config.head_dim, dtype, device)
        self.freqs_cis = precompute_freqs_cis(cache_len, self.config, device)
        self.max_batch_size, self.cache_len = max_batch_size, cache_len

    def cache_dtype(self) -> torch.dtype:
        """The activations' dtype, which the KV cache stores: the float weights' (quantized ones are integers)."""
        weight = self.output.weight
        return weight.dtype if weight.is_floating_point() else self.tok_embeddings.weight.dtype

    def forward(self, idx: Tensor, input_pos: Tensor | None = None, left_pad: Tensor | None = None,
                last_only: bool = False, mask: Tensor | None = None, positions: Tensor | None = None,
                cache_index=None, logits_at: Tensor | None = None) -> Tensor:
        """Float logits (B, T, V) of token ids idx (B, T); (B, 1, V) for the last token only, (B, K, V) for the
        tokens at indices logits_at (K,) only (a serving step needs each row's last).

        input_pos: the tokens' positions, (T,) or (B, T) for each row its own; they are also where the KV cache
        stores their keys and values. None: no cache, a plain causal forward from position 0.
        left_pad: (B,) padding slots at the start of each row: masked out, and not counted as positions by RoPE.
        mask: (B or 1, T, keys) bool, the keys each new token attends to, used as given, for attention shapes that
        positions do not describe (a tree of guesses, a paged cache); default: causal over the cache (within the
        sliding window if the model has one).
        positions: RoPE's positions where they are not input_pos (a tree puts several tokens at one position).
        cache_index: what each layer's KV cache is told about where the new keys go and which keys to read
        (default input_pos; the paged cache takes its slot tables: llama_fast.serving)."""
        freqs, mask = self.block_inputs(*idx.shape, idx.device, input_pos, left_pad, mask, positions)
        cache_index = input_pos if cache_index is None else cache_index
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            # On CPU torch.compile makes one graph of a block and calls it for every layer (shared_forward), so
            # inductor compiles one block instead of n_layers: tinyllama 14 s instead of 40 s on 2 cores, same speed
            block = layer.shared_forward if x.device.type == "cpu" else layer
            x = block(x, freqs, mask, cache_index)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]
        return self.output(self.norm(x)).float()

    def block_inputs(self, B: int, T: int, device, input_pos: Tensor | None = None, left_pad: Tensor | None = None,
                     mask: Tensor | None = None, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What every block is given beside x, for forward's arguments: RoPE frequencies (B, T, head_dim // 2, 2)
        and the attention mask (B, 1, T, keys)."""
        if input_pos is None:
            pos, n_keys = torch.arange(T, device=device), T
            freqs_cis = precompute_freqs_cis(T, self.config, device)
        else:
            assert self.freqs_cis is not None, "call setup_caches() before decoding with a KV cache"
            pos, freqs_cis, n_keys = input_pos, self.freqs_cis, self.cache_len
        freqs = freqs_cis[rope_positions(pos if positions is None else positions, B, T, left_pad)]
        if mask is None:
            mask = causal_mask(n_keys, pos, self.config, left_pad)
        return freqs, mask.expand(B, T, mask.shape[-1])[:, None]


def rope_positions(pos: Tensor, B: int, T: int, left_pad: Tensor | None) -> Tensor:
    """(B, T) positions for RoPE: left padding does not count."""
    pos = pos.expand(B, T)
    return pos if left_pad is None else (pos - left_pad[:, None]).clamp(min=0)


def causal_mask(keys: int | Tensor, pos: Tensor, config: ModelArgs, left_pad: Tensor | None = None) -> Tensor:
    """(T or B, T, n_keys) bool: each token at pos ((T,) or (B, T)) sees the keys at slots up to
    its own position (slot = position), within the last sliding_window ones if the model has one; with left_pad,
    not a row's padding (a padding token sees itself, so its softmax stays finite: no NaN in the cache).
    keys: how many (key j at position j), or the keys' positions (n_keys,) where they are in another order."""
    key = keys if isinstance(keys, Tensor) else torch.arange(keys, device=pos.device)
    mask = key <= pos[..., None]
    if config.sliding_window:
        mask = mask & (key > pos[..., None] - config.sliding_window)
    if left_pad is not None:
        mask = mask & ((key >= left_pad[:, None, None]) | (key == pos[:, None]))
    return mask


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = MoEFeedForward(config) if config.n_experts else FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs, mask, cache_index):
        h = x + self.attention(self.attention_norm(x), freqs, mask, cache_index)
        return h + self.feed_forward(self.ffn_norm(h))

    # forward as one compiled region that every layer reuses (eager: forward itself); see Transformer.forward
    shared_forward = torch.compiler.nested_compile_region(forward)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # Q, K and V in one matmul: one weight read per step instead of three kernel launches.
        qkv_features = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_features, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Qwen2's biases: a float vector added after the matmul, so the (quantized) layer itself stays bias-free
        self.qkv_bias = nn.Parameter(torch.zeros(qkv_features)) if config.qkv_bias else None
        # Qwen3: one RMSNorm weight of head_dim, shared by the heads of Q (and of K)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.kv_cache = None

    def forward(self, x, freqs, mask, cache_index):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x) if self.qkv_bias is None else self.wqkv(x) + self.qkv_bias
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary_emb(q, freqs).transpose(1, 2)
        k = apply_rotary_emb(k, freqs).transpose(1, 2)
        v = v.transpose(1, 2)
        # GQA without copying K/V: the n_rep query heads that share a KV head become n_rep * T query rows.
        q = q.reshape(B, Hkv, H // Hkv * T, D)
        if self.kv_cache is None or cache_index is None:
            y = attention(q, k, v, mask)
        else:
            y = self.kv_cache.attend(q, k, v, cache_index, mask)
        # reshape: CUDA's SDPA returns y stored T-major, which no view splits into H heads (on CPU this is a view)
        y = y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        # gate (w1) and up (w3) projections fused: rows [0, I) are w1, rows [I, 2I) are w3.
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Experts(nn.Module):
    """n_experts linear weights (n_experts, out_features, in_features) in one tensor, read by index: take(idx)
    gives the weights of the experts idx names, a view for one int index (an expert's rows), a gather for a tensor
    of them. qlinear.py has the int8 and int4 forms, with the same method."""
    output_dims, input_dims = {"weight": 1}, {"weight": 2}  # for tp.py, as on the quantized linears

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))

    def take(self, idx: Tensor, dtype) -> Tensor:
        return self.weight[idx].to(dtype)


class MoEFeedForward(nn.Module):
    """Mixture of experts (Mixtral, Qwen3-MoE): a router sends each token to n_active_experts of n_experts SwiGLU
    FFNs, weighted by the softmax of its logits (renormalized over the chosen ones). A few tokens (decoding) gather
    their experts' weights, so a step reads only the chosen experts, as gpt-fast does; more tokens (prefill) run
    each expert once on the tokens routed to it."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        E, D, I = config.n_experts, config.dim, config.intermediate_size
        self.n_experts, self.k, self.norm_topk_prob = E, config.n_active_experts, config.norm_topk_prob
        self.gate = nn.Linear(D, E, bias=False)  # the router
        self.w13 = Experts(E, D, 2 * I)  # gate and up projections fused, as FeedForward's
        self.w2 = Experts(E, I, D)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        # gathering copies k experts per token: cheaper than a pass over every expert while N * k <= n_experts
        y = self.gathered(x, experts, weights) if x.shape[0] * self.k <= self.n_experts else \
            self.grouped(x, experts, weights)
        return y.view(shape)

    def gathered(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # eager: each chosen expert by index, a view (no copy) for F.linear
            return torch.stack([sum(weights[n, j] * self.expert_ffn(x[n], experts[n, j].item())
                                    for j in range(self.k)) for n in range(x.shape[0])])
        # compiled: the chosen experts' rows gathered and multiplied in one fused kernel (bmm-shaped einsums)
        gate, up = torch.einsum("nd,nkod->nko", x, self.w13.take(experts, x.dtype)).chunk(2, dim=-1)
        y = torch.einsum("nki,nkdi->nkd", F.silu(gate) * up, self.w2.take(experts, x.dtype))
        return torch.einsum("nkd,nk->nd", y, weights)

    def grouped(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        order = experts.flatten().argsort(stable=True)  # (token, choice) pairs sorted by expert
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts).tolist()
        tokens, pair_weights = order // self.k, weights.flatten()[order]
        out, start = torch.zeros_like(x), 0
        for e, n in enumerate(counts):
            if n:
                idx = tokens[start:start + n]
                out.index_add_(0, idx, self.expert_ffn(x[idx], e) * pair_weights[start:start + n, None])
            start += n
        return out

    def expert_ffn(self, x: Tensor, e: int) -> Tensor:
        gate, up = F.linear(x, self.w13.take(e, x.dtype)).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2.take(e, x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # normalise in float32 whatever the model dtype, as the reference does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(config: ModelArgs) -> Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, with llama3 or linear scaling applied."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between is interpolated.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def precompute_freqs_cis(seq_len: int, config: ModelArgs, device=None) -> Tensor:
    """(seq_len, head_dim // 2, 2) table of cos and sin, kept in float32 for accuracy."""
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_frequencies(config))
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rotary_emb(x: Tensor, freqs: Tensor) -> Tensor:
    # x: (B, T, heads, D) with (even, odd) pairs rotated together; freqs: (B, T, D // 2, 2)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs[:, :, None]
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)
