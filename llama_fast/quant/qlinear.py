"""Quantized linear layers (weight-only): the int8 and int4 formats, their modules, and round-to-nearest
quantization of a model as module swaps (torchao's approach).

    int8: symmetric per output channel, ATen's _weight_int8pack_mm on CPU (opt-in: a loop generated into compiled
          one-token steps, --cpu_kernels inductor; or activations quantized per token too and oneDNN's integer
          kernel, --cpu_kernels w8a8), a fused dequantising matmul elsewhere
    int4: asymmetric per group of input features, PyTorch's packed int4 kernels on CPU and CUDA

A checkpoint stores int4 codes in a portable layout (pack_int4); pack_for_device() converts them to the layout of
the device's kernel after loading, so one file runs on CPU and CUDA. A new format is a module here with the same
four parts: its tensors, pack_for_device(), forward(), and the two dicts that tell tp.py how to shard it.
GPTQ (gptq.py) produces the int4 format with better rounding.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from llama_fast.cpu.kernels import float32_gemm, inductor_int8, w8a8_library, w8a8_linear, w8a8_pack
from model import Experts

GROUP_SIZES = (32, 64, 128, 256)


def use_gemm(x: Tensor, gemm_tokens: tuple) -> bool:
    """On CPU, from gemm_tokens = (float32, 16-bit) tokens on (prefill, eval's scoring), a quantized linear
    dequantizes its weights once per call and runs the dense GEMM of the activation dtype: ATen's int8/int4 kernels
    are made for a few tokens, and slow with float32 ones (crossovers measured on a 2-core EPYC, see the classes)."""
    return x.device.type == "cpu" and x.shape[:-1].numel() >= gemm_tokens[x.dtype != torch.float32]


def dense_gemm(layer: nn.Module, x: Tensor, multiple: int = 16) -> Tensor:
    """use_gemm's matmul: in float32 for float32 x, or where the CPU's 16-bit GEMM is the slower (layer.float32_from
    set: llama_fast.cpu.choice), the weights dequantized a slice at a time (float32_gemm); else in x's dtype."""
    if x.dtype == torch.float32 or layer.float32_from:
        return float32_gemm(x, lambda i, j: layer.dequantized(torch.float32, i, j), len(layer.weight), multiple)
    return F.linear(x, layer.dequantized(x.dtype))


# ------------------------------------------------------------------------------------------------ the formats

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel: w ≈ q * scale[:, None], q in [-127, 127]."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_qparams(w: Tensor, groupsize: int) -> Tensor:
    """(N, K/g, 2) scale and zero per group: asymmetric min/max, zero in the float domain at code 8
    (w ≈ (q - 8) * scale + zero), the convention of PyTorch's int4 kernels."""
    groups = w.float().reshape(w.shape[0], -1, groupsize)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (hi - lo).clamp(min=1e-6) / 15
    return torch.stack([scales, lo + 8 * scales], dim=-1)


def quantize_int4(w: Tensor, qparams: Tensor, groupsize: int) -> Tensor:
    """Codes 0..15 (uint8, shape of w) for the given per-group (scale, zero)."""
    scales, zeros = qparams[..., 0].repeat_interleave(groupsize, 1), qparams[..., 1].repeat_interleave(groupsize, 1)
    return torch.round((w.float() - (zeros - 8 * scales)) / scales).clamp(0, 15).to(torch.uint8)


def dequantize_int4(q: Tensor, qparams: Tensor, groupsize: int, dtype=torch.float32) -> Tensor:
    """(q - 8) * scale + zero per group, computed in dtype (broadcast over each group: no (N, K) copies of them)."""
    N, K = q.shape
    scales, zeros = qparams.to(dtype).unsqueeze(2).unbind(-1)  # each (N, K/g, 1)
    return ((q.reshape(N, -1, groupsize).to(dtype) - 8) * scales + zeros).reshape(N, K)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) codes -> (N, K/2) bytes, even column in the high nibble: the input layout of
    aten._convert_weight_to_int4pack, and a plain, device-independent one to store."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1)


def unpack_int4_cpu(packed: Tensor, block_n: int) -> Tensor:
    """Codes (N, K) from the layout of aten._convert_weight_to_int4pack_for_cpu, which depends on the CPU's vector
    width (block_n = 64 rows with AVX-512, 32 with AVX2): per block of rows, k-major bytes; byte j of a full block
    holds row j (low nibble) and row j + block_n/2 (high nibble); a shorter last block pairs rows 2j and 2j + 1."""
    N, K = packed.shape[0], packed.shape[1] * 2
    full = N // block_n * block_n
    blocks = packed[:full].reshape(-1, K, block_n // 2).transpose(1, 2)  # (N/block_n, block_n/2, K)
    rows = [torch.cat([blocks & 15, blocks >> 4], dim=1).reshape(full, K)]
    if full < N:
        tail = packed[full:].reshape(K, (N - full) // 2).t()
        rows.append(torch.stack([tail & 15, tail >> 4], dim=1).reshape(N - full, K))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def cpu_int4_block() -> int | None:
    """The row block of this machine's int4 CPU packing (unpack_int4_cpu), found by packing known codes (a full
    block and a short one); None if the layout is none of those (then Int4Linear always uses the kernel)."""
    codes = torch.randint(0, 16, (80, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except (RuntimeError, AttributeError):
        return None
    for block_n in (64, 32):
        if packed.shape == (80, 32) and torch.equal(unpack_int4_cpu(packed, block_n).int(), codes):
            return block_n
    return None


# Found once, at import (microseconds): a constant that compiled graphs read, not a probe they would have to trace
CPU_INT4_BLOCK = cpu_int4_block()


# ---------------------------------------------------------------------------------------- the quantized linears

class Int8Linear(nn.Module):
    # For tp.py: the dimension of each tensor that indexes output features / input features (scales are per
    # output channel, so they apply to a row-parallel layer's partial sums as they do to the total).
    output_dims = {"weight": 0, "scales": 0}
    input_dims = {"weight": 1}
    # use_gemm: 5632 x 2048, 2-core EPYC: float32 4.4 ms/token in the kernel, crossover between 4 and 8 tokens;
    # bf16 512 tokens 37 ms in the kernel, 1.5 ms to dequantize + 14 ms GEMM (scripts/bench_gemv.py --tokens)
    # AVX2 Zen 3 (bf16 GEMMs in float32, dense_gemm): 64 tokens 20 ms in the kernel, 15 ms; 256: 69 ms, 40 ms
    GEMM_TOKENS = (8, 64)
    kernel = "int8pack"  # ATen's weight-only kernel; or "w8a8", "inductor" (use_kernel, llama_fast.cpu)
    library = None  # w8a8's: "onednn" or "fbgemm" (llama_fast.cpu.kernels.w8a8_library)
    float32_from = None  # set by llama_fast.cpu.choice.use_cpu_kernels where 16-bit GEMMs are slow: dense_gemm

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))

    @torch.no_grad()
    def pack_for_device(self):
        # ATen's CPU kernel reads rows in aligned 16-element blocks (a segfault with in_features=172), and inductor
        # rewrites the generic path below into that kernel too: pad rows with zeros to a multiple of 32.
        if self.weight.device.type == "cpu" and self.in_features % 32:
            self.weight = F.pad(self.weight, (0, -self.in_features % 32))

    @torch.no_grad()
    def use_kernel(self, name: str):
        """"w8a8": quantize activations too (llama_fast.cpu.kernels.w8a8_linear, opt-in), for every number of tokens; the
        weight is prepacked for the library w8a8_library() found exact here (opaque: no plain weight is kept).
        "inductor": a loop generated into compiled one-token steps (llama_fast.cpu.kernels.inductor_int8), the weight as it
        is. After pack_for_device, from int8pack."""
        if name == self.kernel:
            return
        if (name not in ("w8a8", "inductor") or self.kernel != "int8pack" or self.weight.device.type != "cpu"
                or name == "w8a8" and not w8a8_library()):
            raise ValueError(f"--cpu_kernels {name}: not available for int8 layers on {self.weight.device.type} here")
        if name == "w8a8":
            self.library = w8a8_library()
            self.weight = w8a8_pack(self.weight[:, :self.in_features].contiguous(), self.library)
            self.scales = self.scales.float()
        self.kernel = name

    def dequantized(self, dtype, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows start:stop of the (N, K) weights in dtype (K padded as the kernel's rows are)."""
        return self.weight[start:stop].to(dtype) * self.scales[start:stop].to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "w8a8":
            return w8a8_linear(x, self.weight, self.scales, self.library)
        K = self.weight.shape[1]
        if K != self.in_features:  # rows padded for the CPU kernel (pack_for_device)
            x = F.pad(x, (0, K - self.in_features))
        if self.kernel == "inductor" and torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            return inductor_int8(x, self.weight, self.scales)
        if use_gemm(x, self.GEMM_TOKENS):
            return dense_gemm(self, x)
        if x.device.type == "cpu" and K % 32 == 0:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, K), self.weight, self.scales.to(x.dtype))
            return y.view(*x.shape[:-1], -1)
        # On GPUs torch.compile fuses the int8 -> activation dtype conversion into the matmul's weight load.
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


def int4_group_split_error(name: str, in_features: int, groupsize: int, world_size: int) -> str | None:
    """A row-parallel int4 layer keeps whole groups on every process (tp.py)."""
    if in_features % (groupsize * world_size):
        return (f"int4 {name} has {in_features} input features: {world_size} processes would split its groups of "
                f"{groupsize} (needs a multiple of {groupsize * world_size})")
    return None


class Int4Linear(nn.Module):
    """Groupwise int4. `weight` holds the portable packed codes (N, K/2) until pack_for_device() converts it to
    the layout of the device's kernel. K may be padded up to a multiple of the group size (padding columns are
    zero; the activation is padded to match)."""
    # For tp.py: codes (N, K/2) and per-group parameters (K/g, N, 2); sharding keeps whole groups (shard_error)
    output_dims = {"weight": 0, "scales_and_zeros": 1}
    input_dims = {"weight": 1, "scales_and_zeros": 0}
    # use_gemm: 5632 x 2048 g32, 2-core EPYC: float32 256 tokens 2.4 s in the kernel, 0.13 s dequantized + GEMM;
    # bf16 512 tokens 39 ms in the kernel, 13 ms to unpack and dequantize + 14 ms GEMM, 64 tokens 5 ms vs 15 ms
    # AVX2 Zen 3 (bf16 GEMMs in float32, dense_gemm): 64 tokens 19 ms in the kernel, 21 ms; 256: 76 ms, 49 ms
    GEMM_TOKENS = (8, 256)
    float32_from = None  # as Int8Linear's

    def __init__(self, in_features: int, out_features: int, groupsize: int):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        padded_in = -(-in_features // groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(padded_in // groupsize, out_features, 2))
        self.kernel = None  # "cpu" or "cuda" once packed

    @property
    def padded_in(self) -> int:  # input features the kernel sees: a whole number of groups
        return self.scales_and_zeros.shape[0] * self.groupsize

    def shard_error(self, name: str, world_size: int, split_inputs: bool) -> str | None:
        """Why this layer cannot be split over world_size processes (tp.py), or None."""
        if self.kernel is not None:
            return "shard int4 layers before qlinear.pack_for_device: packed codes cannot be split"
        if split_inputs:
            return int4_group_split_error(name, self.in_features, self.groupsize, world_size)
        if not split_inputs and self.out_features // world_size % 16:
            return (f"int4 {name} would have {self.out_features // world_size} output features per process; the "
                    f"int4 kernels need a multiple of 16")
        return None

    @torch.no_grad()
    def pack_for_device(self):
        device = self.weight.device
        if device.type == "cpu":
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).int(), 1)
        elif device.type == "cuda":
            inner_k_tiles = 8 if self.padded_in % 128 == 0 else 4 if self.padded_in % 64 == 0 else 2
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)  # the CUDA kernel takes bf16 only
        else:
            raise ValueError(f"int4 weights need a CPU or CUDA device, not {device.type}")
        self.kernel = device.type

    def dequantized(self, dtype, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows start:stop of the (N, padded_in) weights in dtype, from the CPU kernel's layout (where
        CPU_INT4_BLOCK is known; start a multiple of it: the layout packs blocks of rows)."""
        codes = unpack_int4_cpu(self.weight[start:stop], CPU_INT4_BLOCK)
        qparams = self.scales_and_zeros[:, start:stop].transpose(0, 1)
        return dequantize_int4(codes, qparams, self.groupsize, dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        if self.kernel == "cpu" and CPU_INT4_BLOCK and use_gemm(x, self.GEMM_TOKENS):
            y = dense_gemm(self, x, CPU_INT4_BLOCK)
        elif self.kernel == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.groupsize,
                                                          self.scales_and_zeros.to(x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.weight, self.groupsize,
                                                   self.scales_and_zeros).to(x.dtype)
        return y.view(*shape[:-1], -1)


class Int8Experts(nn.Module):
    """model.Experts in int8: codes (E, N, K) and scales (E, N), per output channel of each expert. The chosen
    experts' codes are gathered and dequantized (a decode step reads k of E experts, one byte per weight)."""
    output_dims, input_dims = {"weight": 1, "scales": 1}, {"weight": 2}  # for tp.py

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.register_buffer("weight", torch.empty(n_experts, out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(n_experts, out_features))

    def take(self, idx: Tensor, dtype) -> Tensor:
        return self.weight[idx].to(dtype) * self.scales[idx].to(dtype)[..., None]


class Int4Experts(nn.Module):
    """model.Experts in int4 (the Int4Linear format per expert, kept in its portable packed layout): codes
    (E, N, K/2), per-group scale and zero (E, N, K/g, 2); K padded to whole groups."""
    output_dims = {"weight": 1, "scales_and_zeros": 1}
    input_dims = {"weight": 2, "scales_and_zeros": 2}

    def __init__(self, n_experts: int, in_features: int, out_features: int, groupsize: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.groupsize = groupsize
        padded_in = -(-in_features // groupsize) * groupsize
        self.register_buffer("weight", torch.empty(n_experts, out_features, padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(n_experts, out_features, padded_in // groupsize, 2))

    def shard_error(self, name: str, world_size: int, split_inputs: bool) -> str | None:
        return int4_group_split_error(name, self.in_features, self.groupsize, world_size) if split_inputs else None

    def take(self, idx: Tensor, dtype) -> Tensor:
        packed, qparams = self.weight[idx], self.scales_and_zeros[idx]
        codes = unpack_int4(packed.reshape(-1, packed.shape[-1]))
        w = dequantize_int4(codes, qparams.reshape(-1, *qparams.shape[-2:]), self.groupsize, dtype)
        return w.reshape(*packed.shape[:-1], -1)[..., :self.in_features]


def linear_names(model: nn.Module, quantize_output: bool) -> list:
    """The layers quantize_model quantizes: every linear (the output projection if asked) and every stack of
    experts, but not a mixture of experts' router, whose few weights decide where each token goes."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))
            and (quantize_output or name != "output") and not name.endswith("feed_forward.gate")]


def int4_skip_reason(layer: nn.Module):
    if isinstance(layer, Experts):  # dequantized on the way, not run by the kernels
        return None
    if layer.out_features % 16:  # the CPU packing works on blocks of 16 output rows (CUDA on 8)
        return f"out_features {layer.out_features} is not a multiple of 16"
    return None


def swap_module(model: nn.Module, name: str, new: nn.Module):
    """The submodule called `name` (e.g. "layers.0.attention.wqkv") replaced by `new`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def swap_in_quantized(model: nn.Module, layers: dict, groupsize: int = 0):
    """Replace each named nn.Linear by its quantized module ("int8" or "int4"); others stay as they are."""
    for name, kind in layers.items():
        if kind not in ("int8", "int4"):
            continue
        old = model.get_submodule(name)
        if isinstance(old, Experts):
            new = Int8Experts(old.n_experts, old.in_features, old.out_features) if kind == "int8" else \
                Int4Experts(old.n_experts, old.in_features, old.out_features, groupsize)
        else:
            new = Int8Linear(old.in_features, old.out_features) if kind == "int8" else \
                Int4Linear(old.in_features, old.out_features, groupsize)
        swap_module(model, name, new.to(old.weight.device) if old.weight.device.type != "meta" else new)
    return model


def pack_for_device(model: nn.Module):
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.pack_for_device()
    return model


# ------------------------------------------------------------------------------------------ quantizing a model

@torch.no_grad()
def quantize_linear(layer: nn.Module, kind: str, groupsize: int) -> dict:
    """State dict entries of the round-to-nearest quantized replacement of one nn.Linear (or model.Experts: each
    expert's rows quantized as a linear's, the tensors stacked)."""
    if isinstance(layer, Experts):
        E, N = layer.n_experts, layer.out_features
        flat = nn.Linear(layer.in_features, E * N, bias=False, device="meta")
        flat.weight = nn.Parameter(layer.weight.detach().reshape(E * N, -1), requires_grad=False)
        entries = quantize_linear(flat, kind, groupsize)
        if kind == "int8":
            return {"weight": entries["weight"].view(E, N, -1), "scales": entries["scales"].view(E, N)}
        qparams = entries["scales_and_zeros"].transpose(0, 1)  # (E * N, K/g, 2)
        return {"weight": entries["weight"].view(E, N, -1), "scales_and_zeros": qparams.reshape(E, N, -1, 2)}
    w = layer.weight.detach().float()
    if kind == "int8":
        q, scales = quantize_int8(w)
        return {"weight": q, "scales": scales}
    w = pad_to_groups(w, groupsize)
    qparams = int4_qparams(w, groupsize)
    return int4_entries(quantize_int4(w, qparams, groupsize), qparams)


def pad_to_groups(w: Tensor, groupsize: int) -> Tensor:
    """Zero columns up to a whole number of groups (Int4Linear pads its input to match)."""
    return F.pad(w, (0, -w.shape[1] % groupsize))


def int4_entries(codes: Tensor, qparams: Tensor) -> dict:
    """Int4Linear's stored tensors from codes (N, K) and qparams (N, K/g, 2)."""
    return {"weight": pack_int4(codes), "scales_and_zeros": qparams.transpose(0, 1).contiguous()}


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, groupsize: int = 128, quantize_output: bool = True,
                   progress: bool = True) -> tuple[dict, dict]:
    """Round-to-nearest int8 or int4 of every linear layer. Returns (state_dict, quantization metadata)."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize_model does round-to-nearest int8 or int4, not {mode}: GPTQ is gptq_quantize_model")
    layers, state = {}, {}
    names = linear_names(model, quantize_output)
    for name in tqdm(names, desc=f"quantizing to {mode}", disable=not progress, file=sys.stderr):
        layer = model.get_submodule(name)
        if getattr(layer, "kernel", "addmv") != "addmv":  # its weight is in a kernel's private layout
            raise ValueError(f"{name} holds a weight prepared for the {layer.kernel} kernel: quantize a model "
                             "loaded with cpu_kernels='none'")
        reason = int4_skip_reason(layer) if mode == "int4" else None
        if reason:
            layers[name] = f"kept in {layer.weight.dtype}: {reason}"
            continue
        layers[name] = mode
        for key, t in quantize_linear(layer, mode, groupsize).items():
            state[f"{name}.{key}"] = t
    meta = {"mode": mode, "groupsize": groupsize if mode == "int4" else None, "quantize_output": quantize_output,
            "layers": layers}
    return add_unquantized(model, state, layers), meta


def add_unquantized(model: nn.Module, state: dict, layers: dict) -> dict:
    """The model's other tensors (embeddings, norms, linears kept in float) join the quantized ones."""
    for name, t in model.state_dict().items():
        if layers.get(name.rpartition(".")[0]) not in ("int8", "int4"):
            state.setdefault(name, t)
    return state
