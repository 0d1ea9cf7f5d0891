"""Tensor parallelism over torchrun's processes: each rank holds 1/N of every attention and FFN weight.

    torchrun --standalone --nproc_per_node=2 generate.py --compile --checkpoint_path checkpoints/<repo>/model.pth

Attention is split by heads: Q, K and V column-wise (by output features), query heads and KV heads in the same
proportion so each query head stays with its KV head under GQA; the KV cache then holds only the local KV heads.
The FFN is split by intermediate features: gate and up column-wise. The projections back to the model dimension
(attention `wo`, FFN `w2`) are split row-wise (by input features), so each rank computes a partial sum that an
all-reduce completes: two all-reduces per layer. Embedding, norms and the output projection are replicated, so
every rank computes the same logits and, with the same seed, samples the same token.

The all-reduces are functional collectives in forward hooks: torch.compile traces them, so a compiled decode step
stays one graph per rank. NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU.
"""
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

# A rank that dies or hangs must not leave the others waiting for ever in a collective. Generous, because the
# first collective of a compiled step waits for the slowest rank's compilation.
DEFAULT_TIMEOUT_S = 600


# --------------------------------------------------------------------------------------- the process group

def maybe_init_dist(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Under torchrun with WORLD_SIZE > 1, initialise the default process group (NCCL for CUDA, gloo for CPU) and
    return the device this rank runs on: cuda:LOCAL_RANK for CUDA, else `device`. A no-op returning `device`
    outside torchrun, with one process, or when a process group already exists."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        return device
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on CPU (gloo) or CUDA (NCCL), not {device}")
    if kind == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"{int(os.environ.get('LOCAL_WORLD_SIZE', world_size))} processes on this host but "
                             f"only {torch.cuda.device_count()} GPUs: one GPU per process")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if kind == "cuda":  # device_id binds the communicator to this rank's GPU eagerly
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def destroy_dist():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    dist.barrier()


def from_rank0(obj):
    """Rank 0's `obj` (anything picklable), on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_seed() -> int:
    """Rank 0's seed, for every rank: they then draw the same random numbers, so all ranks sample the same tokens
    and their KV caches stay in step."""
    return from_rank0(torch.initial_seed())


@contextlib.contextmanager
def rank0_output():
    """Under torchrun, inside the block, processes other than rank 0 print nothing (stdout and stderr go to
    /dev/null). An exception leaving the block is reported outside it as usual, by whichever rank raised; so that
    the ranks' reports of the same error do not interleave on the shared stream, stderr then writes each line in
    one piece (Python's writes the text of an error and its newline separately)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(line_buffering=True, write_through=False)
    if int(os.environ.get("RANK", "0")) == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


# ------------------------------------------------------------------------------------------------ sharding

# (layer, split by input features) in each block: row-parallel layers are followed by the all-reduce
SHARDED = (("attention.wqkv", False), ("attention.wo", True), ("feed_forward.w13", False), ("feed_forward.w2", True))


def check_tp(model: nn.Module, world_size: int):
    """Raise a one-line ValueError when `model` cannot be split over world_size processes."""
    config = model.config
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "intermediate_size": config.intermediate_size}
    bad = [f"{name} ({n})" for name, n in sizes.items() if n % world_size]
    if bad:
        raise ValueError(f"tensor parallelism over {world_size} processes needs n_heads, n_kv_heads and "
                         f"intermediate_size divisible by {world_size}: {', '.join(bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not")
    for block in model.layers:
        for name, split_inputs in SHARDED:
            layer = block.get_submodule(name)
            # a quantized layer says whether its format can be split so (e.g. int4 keeps whole groups)
            why = layer.shard_error(name, world_size, split_inputs) if hasattr(layer, "shard_error") else None
            if why:
                raise ValueError(why)


def _take(t: torch.Tensor, dim: int, parts: list, rank: int, world_size: int) -> torch.Tensor:
    """This rank's 1/world_size of each of the consecutive `parts` of t along dim (fractions of t.shape[dim], which
    may hold features packed two per byte or one per group), concatenated (a copy, so the full tensor, possibly
    memory-mapped from the checkpoint, is not kept alive)."""
    scale = t.shape[dim] / sum(parts)
    chunks, start = [], 0
    for size in (round(p * scale) for p in parts):
        step = size // world_size
        chunks.append(t.narrow(dim, start + rank * step, step))
        start += size
    return torch.cat(chunks, dim)


def _replace(layer: nn.Module, name: str, t: torch.Tensor):
    old = getattr(layer, name)
    setattr(layer, name, nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t)


def shard_output_features(layer: nn.Module, parts: list, rank: int, world_size: int):
    """Column-parallel: keep this rank's share of each fused part (e.g. Q, K, V) of the output features. A layer's
    `output_dims` names the dimension of each of its tensors that indexes output features (a float Linear: the
    weight's rows)."""
    for name, dim in getattr(layer, "output_dims", {"weight": 0}).items():
        _replace(layer, name, _take(getattr(layer, name), dim, parts, rank, world_size))
    layer.out_features //= world_size


def shard_input_features(layer: nn.Module, rank: int, world_size: int):
    """Row-parallel: keep this rank's share of the input features (`input_dims`, as output_dims); the outputs then
    need an all-reduce (sum)."""
    for name, dim in getattr(layer, "input_dims", {"weight": 1}).items():
        _replace(layer, name, _take(getattr(layer, name), dim, [layer.in_features], rank, world_size))
    layer.in_features //= world_size


def _all_reduce_output(module, args, output):
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def apply_tp(model: nn.Module, rank: int | None = None, world_size: int | None = None) -> nn.Module:
    """Shard a loaded Transformer in place for this rank of the default process group (see the module docstring).
    Call it before moving the model to its device and before qlinear.pack_for_device, so that a rank never holds
    the whole model on its device and int4 codes are still in their portable layout."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if world_size == 1:
        return model
    if getattr(model, "tp_world_size", 1) > 1:
        raise ValueError("the model is already sharded")
    check_tp(model, world_size)
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        shard_output_features(attn.wqkv, [H * D, Hkv * D, Hkv * D], rank, world_size)
        if attn.qkv_bias is not None:  # Qwen2: the biases of this rank's Q, K and V rows (the norms are per head)
            _replace(attn, "qkv_bias", _take(attn.qkv_bias, 0, [H * D, Hkv * D, Hkv * D], rank, world_size))
        shard_input_features(attn.wo, rank, world_size)
        attn.n_heads, attn.n_kv_heads = H // world_size, Hkv // world_size
        I = ffn.w2.in_features
        shard_output_features(ffn.w13, [I, I], rank, world_size)
        shard_input_features(ffn.w2, rank, world_size)
        attn.register_forward_hook(_all_reduce_output)
        ffn.register_forward_hook(_all_reduce_output)
    model.tp_world_size = world_size
    return model


def main(argv=None):
    """`python tp.py` or `torchrun tp.py`: a library run as a command would do nothing and exit 0."""
    sys.exit("error: tp.py is the tensor-parallelism library, not a command; run a command under torchrun, e.g. "
             "torchrun --standalone --nproc_per_node=2 generate.py --checkpoint_path ...")


if __name__ == "__main__":
    main()
