"""A single-file Llama-family transformer with a static KV cache.

Covers Llama-2/3/3.1/3.2, CodeLlama, Mistral, TinyLlama, the TinyStories models, Qwen2/2.5 and Qwen3:
GQA, RMSNorm, SwiGLU, RoPE with `rope_theta` and llama3-style frequency scaling, Mistral's sliding window,
Qwen2's Q/K/V biases and Qwen3's per-head Q/K norms (switches in ModelArgs, read from the checkpoint's config).
Weights use Meta's interleaved RoPE layout (as gpt-fast does); the HF converter permutes Q/K.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cpu_kernels import INT8_KERNELS, KERNELS, choose, float32_from, float32_gemm, forcible
from model_config import ModelArgs


class Linear(nn.Linear):
    """nn.Linear without bias whose CPU matmul is the kernel cpu_kernels chose for this machine (`kernel`): ATen's
    addmv for one token (F.linear for several) unless use_kernel() switched it, e.g. to oneDNN on a prepacked
    weight. (decoding.cpu_inductor keeps inductor from decomposing addmv into a slower generated reduction.)"""
    kernel = "addmv"
    float32_from = None  # several tokens: from this many, the GEMM in float32 (cpu_kernels.float32_from)

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    @torch.no_grad()
    def use_kernel(self, name: str):
        """Switch to a cpu_kernels kernel, preparing (e.g. prepacking) the weight for it; after loading, on CPU."""
        prepare, _ = KERNELS[name]
        if name != self.kernel:
            assert self.kernel == "addmv", "a prepared weight cannot be prepared again"
            self.weight = nn.Parameter(prepare(self.weight.detach()), requires_grad=False)
            self.kernel = name

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight)
        if self.float32_from and x.shape[:-1].numel() >= self.float32_from:
            return float32_gemm(x, lambda i, j: self.weight[i:j].float(), len(self.weight))
        return KERNELS[self.kernel][1](x, self.weight)


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

    def copy(self, src: Tensor, dst: Tensor):
        """The keys and values at slots src copied to slots dst (lookahead decoding keeps an accepted guess's)."""
        self.k_cache[:, :, dst] = self.k_cache[:, :, src]
        self.v_cache[:, :, dst] = self.v_cache[:, :, src]


class PagedKVCache(nn.Module):
    """Keys and values of many sequences in one pool of fixed-size blocks (serving: engine.py), as vLLM's
    PagedAttention keeps them: (n_slots, n_kv_heads, head_dim), slot = block * block_size + offset. Which blocks hold
    a sequence's tokens, in order, is its block table (paged_cache.py); update() is given it expanded to slots."""

    def __init__(self, n_slots, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (n_slots, n_kv_heads, head_dim)
        self.register_buffer("k_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: tuple[Tensor, Tensor], k: Tensor, v: Tensor):
        # k, v: (B, n_kv_heads, T, head_dim) written to slots[0] (B, T); returns each row's keys and values
        # (B, n_kv_heads, S, head_dim) read from slots[1] (B, S), the row's slots in position order. index_select
        # copies whole slots, 4x faster than indexing (a dense copy for SDPA costs more than it saves).
        self.write(slots[0], k, v)
        B, S = slots[1].shape
        read = slots[1].flatten()
        return tuple(pool.index_select(0, read).view(B, S, *pool.shape[1:]).transpose(1, 2)
                     for pool in (self.k_pool, self.v_pool))

    def write(self, slots: Tensor, k: Tensor, v: Tensor):
        B, H, T, D = k.shape
        self.k_pool[slots.flatten()] = k.transpose(1, 2).reshape(B * T, H, D)
        self.v_pool[slots.flatten()] = v.transpose(1, 2).reshape(B * T, H, D)

    def attend_one(self, q: Tensor, k: Tensor, v: Tensor, slots: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        """Decode attention (see attend_one) straight from the pool: the indexing is not copied, inductor fuses it
        into the reductions, so each key is read once where it lies (2-core CPU, B=16 x 512 keys: 2.3 ms a layer
        against 18 for gather + SDPA)."""
        self.write(slots[0], k, v)
        return attend_one(q, self.k_pool[slots[1]], self.v_pool[slots[1]], mask)


def attend_one(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of one new token per row, for compiled CPU graphs: q (B, n_kv_heads, n_rep, head_dim), keys and
    values (B, S, n_kv_heads, head_dim) (views: a static cache transposed, or a paged pool indexed), mask (B, S).
    Written as products and sums, which inductor fuses into a few reductions with float32 accumulation. ATen's
    flash-attention kernel pays a fixed cost per (row, head), so with one query row per KV head (n_rep = 1: Llama-2,
    stories) this is 2-7x faster on a 2-core CPU (llama-2-7b's 32 heads x 1024 keys: 1.1 ms a layer against 4.2);
    with n_rep >= 2 they are even and with 8 SDPA wins (scripts/bench_attention.py). Eager, it would materialise
    every product: the eager path is SDPA."""
    scores = (q[:, None] * keys[:, :, :, None]).sum(-1, dtype=torch.float32) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~mask[:, :, None, None], float("-inf")).softmax(1)  # (B, S, n_kv_heads, n_rep)
    return (probs[..., None] * values[:, :, :, None].float()).sum(1).to(q.dtype)


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("freqs_cis", None, persistent=False)
        # the KV cache's shape; config.max_seq_len is the context the model was trained for, cache_len <= it
        self.max_batch_size = self.cache_len = 0
        self.cpu_kernel = "addmv"  # the float linears' CPU matmul (use_cpu_kernels)
        self.cpu_gemm_from = None  # several tokens: from this many, GEMMs in float32 (use_cpu_kernels)

    def setup_caches(self, max_batch_size: int, cache_len: int):
        """Allocate KV caches and the RoPE table for up to max_batch_size sequences of cache_len tokens."""
        if cache_len > self.config.max_seq_len:
            raise ValueError(f"{cache_len} tokens exceed the model's context of {self.config.max_seq_len}")
        if (max_batch_size, cache_len) == (self.max_batch_size, self.cache_len):
            return
        weight = self.output.weight
        dtype = weight.dtype if weight.is_floating_point() else self.tok_embeddings.weight.dtype
        for layer in self.layers:  # the layer's own head count: under tensor parallelism, its local heads
            layer.attention.kv_cache = KVCache(max_batch_size, cache_len, layer.attention.n_kv_heads,
                                               self.config.head_dim, dtype, weight.device)
        self.freqs_cis = precompute_freqs_cis(cache_len, self.config, weight.device)
        self.max_batch_size, self.cache_len = max_batch_size, cache_len

    def copy_cache_slots(self, src: Tensor, dst: Tensor):
        """Every layer's keys and values at cache slots src copied to slots dst (the static cache)."""
        for layer in self.layers:
            layer.attention.kv_cache.copy(src, dst)

    def setup_paged_cache(self, n_blocks: int, block_size: int):
        """A pool of n_blocks KV blocks of block_size tokens (forward with slots) instead of the static cache."""
        weight = self.output.weight
        dtype = weight.dtype if weight.is_floating_point() else self.tok_embeddings.weight.dtype
        for layer in self.layers:
            layer.attention.kv_cache = PagedKVCache(n_blocks * block_size, layer.attention.n_kv_heads,
                                                    self.config.head_dim, dtype, weight.device)
        self.freqs_cis = precompute_freqs_cis(self.config.max_seq_len, self.config, weight.device)
        self.max_batch_size = self.cache_len = 0  # a later setup_caches() allocates a static cache again

    def use_cpu_kernels(self, force: str = "auto", gemm: str = "auto") -> str:
        """Give the float linears the CPU matmul kernel that is fastest here for their shapes (cpu_kernels.choose:
        measured once per machine and cached), or the one `force` names. The output projection keeps addmv when
        it shares its weight with the embedding. Returns the kernel's name. Several tokens: the linears (float,
        int8, int4) of a 16-bit model run their GEMM in float32 from cpu_kernels.float32_from(dtype, gemm) tokens.

        force="w8a8" (opt-in, never auto's choice: it changes the numerics): the int8 layers (qlinear.Int8Linear)
        quantize their activations per token too (cpu_kernels.w8a8_linear); float linears, if any, get auto's.
        force="inductor": the int8 layers take it too; float linears that cannot (float32) get auto's."""
        int8 = [m for m in self.modules() if getattr(m, "kernel", None) in INT8_KERNELS]
        if force == "w8a8" and not int8:
            raise ValueError("--cpu_kernels w8a8 is for int8 checkpoints (quantize.py --mode int8): this one has "
                             "no int8 layers")
        int8_kernel = force if force in ("w8a8", "inductor") and int8 else None
        for m in int8 if int8_kernel else []:
            m.use_kernel(force)
        layers = [m for m in self.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"
                  and m.weight is not self.tok_embeddings.weight]
        kernel = self.cpu_kernel
        if layers:
            dtype = layers[0].weight.dtype
            kernel = choose([tuple(m.weight.shape) for m in layers], dtype,
                            "auto" if int8_kernel and force not in forcible(dtype) else force)
            for m in layers:
                m.use_kernel(kernel)
        self.cpu_kernel = int8_kernel or kernel
        self.use_float32_gemm(gemm)
        return self.cpu_kernel

    def use_float32_gemm(self, gemm: str = "auto"):
        """use_cpu_kernels' several-token half: cpu_kernels.float32_from, for layers with a plain weight."""
        on_cpu = self.tok_embeddings.weight.device.type == "cpu"
        self.cpu_gemm_from = float32_from(self.tok_embeddings.weight.dtype, gemm) if on_cpu else None
        for m in self.modules():
            if hasattr(m, "float32_from"):
                m.float32_from = None if getattr(m, "kernel", None) == "onednn" else self.cpu_gemm_from

    def forward(self, idx: Tensor, input_pos: Tensor | None = None, left_pad: Tensor | None = None,
                last_only: bool = False, mask: Tensor | None = None, slots: tuple | None = None,
                positions: Tensor | None = None) -> Tensor:
        """idx: (B, T) token ids; input_pos: (T,) cache positions they are written to (None: no cache, a plain
        causal forward from position 0); left_pad: (B,) number of padding slots at the start of each row, which
        are masked out and do not count as positions for RoPE. mask: (B or 1, T, cache_len) bool, the cache slots
        each new token attends to, for attention shapes that positions do not describe (e.g. a tree of candidate
        continuations), used as given (any sliding window included); default: every slot up to the token's own
        position (within the last sliding_window ones if the model has one). Returns float logits (B, T or 1, V).

        slots: the paged cache instead (setup_paged_cache; continuous batching, engine.py): (write (B, T), read
        (B, S)), the pool slots the new tokens' keys and values go to and each row's slots in position order (its
        block table expanded), so that key j is at position j; input_pos is then (B, T), each row's own positions.

        positions: (T,) the tokens' positions for RoPE where they are not their cache slots input_pos: a tree of
        guesses (lookahead decoding) puts several tokens at one position, each in a slot of its own (see tree_mask)."""
        n_keys = None if slots is None else slots[1].shape[1]
        freqs, causal = self.block_inputs(idx.shape[0], idx.shape[1], idx.device, input_pos, left_pad, n_keys)
        if positions is not None:
            freqs = self.freqs_cis[positions.expand(idx.shape[0], -1)]
        mask = causal if mask is None else mask[:, None]
        cache_index = input_pos if slots is None else slots  # where each layer's KV cache writes: see its update()
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            # On CPU torch.compile makes one graph of a block and calls it for every layer (shared_forward), so
            # inductor compiles one block instead of n_layers: tinyllama 14 s instead of 40 s on 2 cores, same speed
            x = (layer.shared_forward(x, freqs, mask, cache_index) if x.device.type == "cpu" else
                 layer(x, freqs, mask, cache_index))
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def block_inputs(self, B: int, T: int, device, input_pos: Tensor | None = None, left_pad: Tensor | None = None,
                     n_keys: int | None = None):
        """RoPE frequencies (B, T, head_dim // 2, 2) and attention mask (B, 1, T, keys) for the layers: T tokens at
        cache positions input_pos ((T,), or (B, T) per row), or (input_pos None) a plain causal sequence from
        position 0 without the cache. Keys: the cache's slots, or n_keys (the paged cache's)."""
        if input_pos is None:
            pos = torch.arange(T, device=device)
            freqs_cis, n_keys = precompute_freqs_cis(T, self.config, device), T
        else:
            assert self.freqs_cis is not None, "call setup_caches() before decoding with a KV cache"
            pos, freqs_cis, n_keys = input_pos, self.freqs_cis, n_keys or self.cache_len
        key_pos = torch.arange(n_keys, device=device)
        mask = key_pos <= pos[..., None]  # (T or B, T, S) causal
        if self.config.sliding_window:  # and within the window (slot distance = position distance, padded or not)
            mask = mask & (key_pos > pos[..., None] - self.config.sliding_window)
        rope_pos = pos.expand(B, T)
        if left_pad is not None:
            # Padding keys are invisible; a padding query sees itself so its softmax stays finite (no NaN in the cache).
            mask = mask & ((key_pos >= left_pad[:, None, None]) | (key_pos == pos[:, None]))
            rope_pos = (rope_pos - left_pad[:, None]).clamp(min=0)
        return freqs_cis[rope_pos], mask.expand(B, T, n_keys)[:, None]

    def tree_mask(self, tree: Tensor, offsets: Tensor, start: Tensor) -> Tensor:
        """forward's mask (1, T, cache_len) for T tokens written at cache slots start..start+T-1 (start: (1,)) whose
        positions are start + offsets (T,): each sees every cached slot before start and the new tokens that
        tree (T, T) allows it, within the sliding window if the model has one (by position, not slot)."""
        T, key = tree.shape[0], torch.arange(self.cache_len, device=tree.device)
        rel = (key - start).clamp(0, T - 1)  # a key slot's index among the new tokens
        new = (key >= start) & (key < start + T)
        mask = (key < start)[None] | (new[None] & tree[:, rel])
        if self.config.sliding_window:
            key_pos = torch.where(new, start + offsets[rel], key)
            mask = mask & (key_pos[None] > (start + offsets)[:, None] - self.config.sliding_window)
        return mask[None]


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = MoEFeedForward(config) if config.n_experts else FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    # forward as one compiled region that every layer reuses (eager: forward itself); see Transformer.forward
    shared_forward = torch.compiler.nested_compile_region(forward)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # Q, K and V in one matmul: one weight read per step instead of three kernel launches.
        qkv_features = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = Linear(config.dim, qkv_features)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim)
        # Qwen2's biases: a float vector added after the matmul, so the (quantized) layer itself stays bias-free
        self.qkv_bias = nn.Parameter(torch.zeros(qkv_features)) if config.qkv_bias else None
        # Qwen3: one RMSNorm weight of head_dim, shared by the heads of Q (and of K)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.kv_cache = None

    def forward(self, x, freqs, mask, input_pos):
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
        n_rep = H // Hkv
        q = q.reshape(B, Hkv, n_rep * T, D)
        paged = isinstance(self.kv_cache, PagedKVCache)
        if T == 1 and (paged or n_rep == 1) and input_pos is not None and x.is_cpu and torch.compiler.is_compiling():
            if paged:  # serving's decode step: no gather
                y = self.kv_cache.attend_one(q, k, v, input_pos, mask[:, 0, 0])
            else:  # one query row per head, SDPA's worst case (see attend_one)
                keys, values = self.kv_cache.update(input_pos, k, v)
                y = attend_one(q, keys.transpose(1, 2), values.transpose(1, 2), mask[:, 0, 0])
        else:
            if self.kv_cache is not None and input_pos is not None:
                k, v = self.kv_cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, n_rep, 1) if n_rep > 1 else mask)
        # reshape: CUDA's SDPA returns y stored T-major, which no view splits into H heads (on CPU this is a view)
        y = y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        # gate (w1) and up (w3) projections fused: rows [0, I) are w1, rows [I, 2I) are w3.
        self.w13 = Linear(config.dim, 2 * config.intermediate_size)
        self.w2 = Linear(config.intermediate_size, config.dim)

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
        self.gate = Linear(D, E)  # the router
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
