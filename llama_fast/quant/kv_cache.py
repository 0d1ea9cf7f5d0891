"""int8 KV caches, for the serving engine's paged pool (serve.py --kv_cache_dtype int8: Int8PagedKVCache) and for
the static cache of generate.py (--kv_cache_dtype int8: Int8KVCache): every key and value vector (one token, one KV
head) is stored as head_dim int8 numbers and one float16 scale, symmetric, rounded to nearest:
head_dim + 2 bytes instead of 2 * head_dim, so the same memory holds 1.94x the tokens at head_dim 64 (1.97x at
128). Quantized as it is written; read back through the block table where attention reads it: a compiled CPU decode step
multiplies the int8 numbers in its fused reductions and applies the scales outside the sums over head_dim
(attend_one), and never makes a float copy of the pool (the pitfall of torchao's int8 cache, which dequantized the
whole cache every step and lost 31% of decode speed at 8k). Other steps (prompt chunks, eager, CUDA) dequantize
what they gather, each row's own context.
"""
import torch
import torch.nn as nn
from torch import Tensor

from llama_fast.cpu.layers import attend_several
from llama_fast.serving.paged_cache import PagedKVCache, take
from model import KVCache, Transformer, attention

# Compiled CPU steps of up to this many tokens per row read the cache in fused sums (generated reductions); longer
# ones (a compiled prefill) dequantize it for SDPA, whose blocked kernel is the faster at that size
FUSED_TOKENS = 32
SMALLEST_SCALE = 2.0 ** -14  # float16's smallest normal number: a vector of near-zeros keeps a usable scale


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., head_dim) as int8 (..., head_dim) and one float16 scale (...) per vector: x ~ q * scale, with
    |x - q * scale| <= scale / 2 elementwise."""
    scale = (x.abs().amax(-1).float() / 127).clamp(min=SMALLEST_SCALE).half()
    q = (x.float() / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


class Int8PagedKVCache(PagedKVCache):
    """PagedKVCache with int8 pools and a float16 scale per slot and KV head."""

    def __init__(self, n_slots, n_kv_heads, head_dim, dtype, device=None):
        super().__init__(n_slots, n_kv_heads, head_dim, torch.int8, device)
        self.dtype = dtype  # what reads give back: the model's activations' dtype
        for name in ("k_scale", "v_scale"):
            self.register_buffer(name, torch.zeros(n_slots, n_kv_heads, dtype=torch.float16, device=device),
                                 persistent=False)

    @staticmethod
    def slot_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_kv_heads * (head_dim + 2)

    def write(self, slots: Tensor, k: Tensor, v: Tensor):
        B, H, T, D = k.shape  # (B, n_kv_heads, T, head_dim) to slots (B, T)
        for x, pool, scales in ((k, self.k_pool, self.k_scale), (v, self.v_pool, self.v_scale)):
            q, scale = quantize(x.transpose(1, 2).reshape(B * T, H, D))
            pool[slots.flatten()] = q
            scales[slots.flatten()] = scale

    def read(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        return (dequantize(take(self.k_pool, slots), take(self.k_scale, slots), self.dtype),
                dequantize(take(self.v_pool, slots), take(self.v_scale, slots), self.dtype))

    def read_stored(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (take(self.k_pool, slots), take(self.v_pool, slots), take(self.k_scale, slots),
                take(self.v_scale, slots))


class Int8KVCache(KVCache):
    """The static KV cache in int8 with a float16 scale per vector, (batch, n_kv_heads, cache_len, head_dim) and
    (batch, n_kv_heads, cache_len). A compiled CPU step reads it in fused sums: attend_one for one token per row,
    attend_several for up to FUSED_TOKENS (speculative and lookahead verification). Other steps (prefill, eager,
    CUDA) dequantize the positions up to the last one written (eager: known on the host) or the whole cache
    (compiled: one graph for every length)."""

    def __init__(self, max_batch_size, cache_len, n_kv_heads, head_dim, dtype, device=None):
        nn.Module.__init__(self)
        self.dtype = dtype
        for name, shape, kind in (("k_cache", (head_dim,), torch.int8), ("v_cache", (head_dim,), torch.int8),
                                  ("k_scale", (), torch.float16), ("v_scale", (), torch.float16)):
            self.register_buffer(name, torch.zeros(max_batch_size, n_kv_heads, cache_len, *shape, dtype=kind,
                                                   device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        B = k.shape[0]
        for x, cache, scales in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            q, scale = quantize(x)
            cache[:B, :, input_pos] = q
            scales[:B, :, input_pos] = scale
        return self.k_cache[:B], self.v_cache[:B]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, mask: Tensor) -> Tensor:
        B = k.shape[0]
        keys, values = self.update(input_pos, k, v)
        key_scale, value_scale = self.k_scale[:B], self.v_scale[:B]
        # compiled on CPU, the whole cache (one graph for every length) read in fused sums
        if q.is_cpu and torch.compiler.is_compiling() and mask.shape[2] <= FUSED_TOKENS:
            return attend_several(q, keys.transpose(1, 2), values.transpose(1, 2), mask, key_scale.transpose(1, 2),
                                  value_scale.transpose(1, 2))
        n = keys.shape[2] if torch.compiler.is_compiling() else int(input_pos.max()) + 1
        keys, values = (dequantize(x[:, :, :n], s[:, :, :n], self.dtype) for x, s in ((keys, key_scale),
                                                                                     (values, value_scale)))
        return attention(q, keys, values, mask[..., :n])


def use_int8_kv_cache(model: Transformer) -> Transformer:
    """generate.py --kv_cache_dtype int8: the model's next setup_caches() allocates Int8KVCache."""
    model.kv_cache_class = Int8KVCache
    model.max_batch_size = model.cache_len = 0  # a cache already allocated is allocated again
    return model
