"""The layers that llama_fast.cpu.choice swaps into a loaded model on CPU: a linear whose matmul is a CPU kernel, and a
KV cache whose one-token attention, compiled, is a fused reduction instead of SDPA."""
import torch
import torch.nn as nn
from torch import Tensor

from llama_fast.cpu.kernels import KERNELS, float32_gemm
from model import KVCache


class CpuLinear(nn.Linear):
    """nn.Linear without bias whose one-token matmul is `kernel`, one of kernels.KERNELS (addmv, oneDNN on a prepacked
    weight, or inductor's generated loop), whose matmuls of float32_from tokens or more run in float32 (where this
    CPU's 16-bit GEMM is the slow one: kernels.float32_gemm), and whose other several-token matmuls are `several`'s
    (another kernel, on a copy of the weight prepared for it: choice.several_for) or the one-token kernel's. Made
    from a loaded nn.Linear, sharing its weight unless the kernel prepares (prepacks) it."""

    def __init__(self, linear: nn.Linear, kernel: str = "addmv", float32_from: int | None = None,
                 several: str | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        prepare, self.multiply = KERNELS[kernel]
        self.weight = linear.weight if prepare is None else \
            nn.Parameter(prepare(linear.weight.detach()), requires_grad=False)
        # not in the state dict: a copy that only several-token steps read (weight_bytes counts what decoding reads)
        prepare, self.multiply_several = KERNELS[several] if several else (None, None)
        if several and prepare is None:
            raise ValueError(f"several={several!r}: the several-token kernel reads a copy it prepares (onednn)")
        self.register_buffer("several_weight", prepare(linear.weight.detach()) if several else None, persistent=False)
        self.register_parameter("bias", None)
        self.kernel, self.float32_from, self.several = kernel, float32_from, several

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.shape[:-1].numel()
        if self.float32_from and tokens >= self.float32_from:
            return float32_gemm(x, lambda i, j: self.weight[i:j].float(), len(self.weight))
        if self.several and tokens > 1:
            return self.multiply_several(x, self.several_weight)
        return self.multiply(x, self.weight)


class CpuKVCache(KVCache):
    """The static KV cache, read in compiled one-token steps by attend_one where that beats SDPA: one query row
    per KV head (n_rep = 1: Llama-2, the stories models)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, mask: Tensor) -> Tensor:
        if q.shape[2] == 1 and torch.compiler.is_compiling():
            keys, values = self.update(input_pos, k, v)
            return attend_one(q, keys.transpose(1, 2), values.transpose(1, 2), mask[:, 0, 0])
        return super().attend(q, k, v, input_pos, mask)


def attend_one(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, key_scale: Tensor | None = None,
               value_scale: Tensor | None = None) -> Tensor:
    """Attention of one new token per row, for compiled CPU graphs: q (B, n_kv_heads, n_rep, head_dim), keys and
    values (B, S, n_kv_heads, head_dim) (views: a static cache transposed, or a paged pool indexed), mask (B, S),
    or (B, S, 1, n_rep) when each query row sees its own keys (attend_several). Written as products and sums,
    which inductor fuses into a few reductions with float32 accumulation. ATen's flash-attention kernel pays a
    fixed cost per (row, head), so with one query row per KV head (n_rep = 1: Llama-2, stories) this is 2-7x
    faster on a 2-core CPU (llama-2-7b's 32 heads x 1024 keys: 1.1 ms a layer against 4.2); with n_rep >= 2 they
    are even and with 8 SDPA wins (scripts/bench_attention.py). Eager, it would materialise every product: the
    eager path is SDPA. Keys and values stored as integers (an int8 KV cache) come with a scale per vector,
    key_scale and value_scale (B, S, n_kv_heads), applied outside the sums over head_dim: once per (key, query
    head), not once per number."""
    scores = (q[:, None] * keys[:, :, :, None]).sum(-1, dtype=torch.float32) * q.shape[-1] ** -0.5
    if key_scale is not None:
        scores = scores * key_scale[..., None].float()
    visible = mask[:, :, None, None] if mask.dim() == 2 else mask
    probs = scores.masked_fill(~visible, float("-inf")).softmax(1)  # (B, S, n_kv_heads, n_rep)
    if value_scale is not None:
        probs = probs * value_scale[..., None].float()
    return (probs[..., None] * values[:, :, :, None].float()).sum(1).to(q.dtype)


def attend_several(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, key_scale: Tensor | None = None,
                   value_scale: Tensor | None = None) -> Tensor:
    """attend_one for T new tokens per row (a verification step; T = 1: attend_one itself): q (B, n_kv_heads,
    n_rep * T, head_dim), the query heads of a KV head as rows (model.attention's layout), mask (B, 1, T, S); keys,
    values and scales as attend_one's. The T tokens are more query rows of their KV head, each row with its own
    mask, so that an int8 cache is read in the fused sums too, never dequantized whole."""
    if mask.shape[2] == 1:
        return attend_one(q, keys, values, mask[:, 0, 0], key_scale, value_scale)
    n_rep = q.shape[2] // mask.shape[2]
    visible = mask[:, 0].transpose(1, 2).repeat(1, 1, n_rep)  # (B, S, n_rep * T): row rep * T + t sees mask t
    return attend_one(q, keys, values, visible[:, :, None], key_scale, value_scale)
