"""ModelArgs: the shape and switches of a model, as model_config.json beside every checkpoint stores them, read
from a Hugging Face config.json (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE) or named by a preset. Every
field is type- and range-checked, so a hand-edited file fails in one line that names the field.
"""
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONFIG_NAME = "model_config.json"  # ModelArgs beside every checkpoint: loaders read it instead of guessing from paths
HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")  # config.json model_types we convert

# The smallest value of each numeric ModelArgs field; 0 means "derive it" where the field's comment says so.
FIELD_MINIMUM = {"dim": 1, "n_layers": 1, "n_heads": 1, "n_kv_heads": 0, "vocab_size": 1, "intermediate_size": 0,
                 "head_dim": 0, "max_seq_len": 1, "norm_eps": 0.0, "rope_theta": 0.0, "sliding_window": 0,
                 "n_experts": 0, "n_active_experts": 0}
_KIND = {int: "an integer", float: "a number", bool: "true or false", dict: "a JSON object"}


def checked_field(name: str, value, kind: type, minimum=None):
    """`value` as a `kind` (int, float, bool or dict; an int is also a float, a bool is not an int), or a one-line
    ValueError naming the field. Floats must be finite and, with a minimum of 0.0, strictly positive."""
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{name} must be {_KIND[kind]}, got {value!r}")
    if kind is float and not (math.isfinite(value) and value > minimum):
        raise ValueError(f"{name} must be a finite number > {minimum}, got {value}")
    if kind is int and minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# rope_scaling as model.py applies it: each rope_type with every field it reads (floats > 0, ints >= 1, factor >= 1)
ROPE_FIELDS = {"default": {}, "linear": {"factor": float},
               "llama3": {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
                          "original_max_position_embeddings": int}}


def checked_rope_scaling(rope: dict) -> dict:
    """rope_scaling as model.py will apply it, one rule for model_config.json and the converter's config.json: {}
    (none), or a supported rope_type (HF's older `type` key read as one) with every field it uses, each in range,
    and nothing else (a field of another scaling method would be silently ignored)."""
    rope = {k: v for k, v in rope.items() if k != "rope_theta"}  # transformers 5 keeps theta among them
    kind, old = rope.pop("rope_type", None), rope.pop("type", None)
    if kind and old and kind != old:
        raise ValueError(f"rope_scaling says rope_type {kind!r} and type {old!r}")
    kind = kind or old or "default"
    if kind not in ROPE_FIELDS:
        raise ValueError(f"unsupported rope_scaling rope_type {kind!r}: supported are {', '.join(ROPE_FIELDS)}")
    wanted = ROPE_FIELDS[kind]
    for name in [*wanted, *rope]:
        if name not in wanted:
            raise ValueError(f"rope_scaling ({kind}) has a field {name} that it does not use")
        if rope.get(name) is None:
            raise ValueError(f"rope_scaling ({kind}) has no {name}")
        rope[name] = checked_field(f"rope_scaling {name}", rope[name], wanted[name], 1 if wanted[name] is int else 0.0)
    if kind == "default":
        return {}
    if rope["factor"] < 1:  # a factor below 1 would shrink the context the model was trained for
        raise ValueError(f"rope_scaling factor must be >= 1, got {rope['factor']}")
    if kind == "llama3" and not rope["low_freq_factor"] < rope["high_freq_factor"]:
        raise ValueError("rope_scaling low_freq_factor must be < high_freq_factor")
    return {"rope_type": kind, **rope}


def hf_field(cfg: dict, key: str, kind: type = int, default=None):
    """A field of an HF config.json, named in the error if it is missing (and has no default) or mistyped."""
    if cfg.get(key) is None:
        if default is None:
            raise ValueError(f"config.json has no {key}")
        return default
    return checked_field(key, cfg[key], kind, 1 if kind is int else 0.0)  # HF sizes are given, never "derive it"


def hf_moe_fields(cfg: dict, family: str) -> dict:
    """The mixture-of-experts fields; Mixtral always renormalizes the chosen experts' weights, Qwen3-MoE says."""
    if family == "mixtral":
        return dict(n_experts=hf_field(cfg, "num_local_experts"), n_active_experts=hf_field(cfg, "num_experts_per_tok"))
    if family == "qwen3_moe":  # num_experts, or num_local_experts as transformers 5 writes it
        experts = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
        return dict(n_experts=hf_field(cfg, experts), n_active_experts=hf_field(cfg, "num_experts_per_tok"),
                    norm_topk_prob=hf_field(cfg, "norm_topk_prob", bool, False))
    return {}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0  # 0 means n_heads (no GQA)
    vocab_size: int = 32000
    intermediate_size: int = 0  # 0 means Llama's 2/3 * 4 * dim rounded up to a multiple of 256
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3"|"linear", "factor": ...}
    max_seq_len: int = 2048  # longest context the model was trained for
    tie_embeddings: bool = False
    sliding_window: int = 0  # Mistral: each token attends to the last sliding_window positions only (0: all)
    qkv_bias: bool = False  # Qwen2: Q, K and V projections have biases
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of Q and K before RoPE
    n_experts: int = 0  # mixture of experts (Mixtral, Qwen3-MoE): experts per layer, each intermediate_size wide
    n_active_experts: int = 0  # experts a token is routed to
    norm_topk_prob: bool = True  # the chosen experts' weights renormalized to sum to 1 (Mixtral; a Qwen3-MoE flag)
    vocab_padded: bool = False  # the embedding has rows no token uses (Qwen rounds it up): a smaller tokenizer fits

    def __post_init__(self):
        for f in fields(self):  # a hand-edited model_config.json: one line naming the field at fault
            setattr(self, f.name, checked_field(f.name, getattr(self, f.name), f.type, FIELD_MINIMUM.get(f.name)))
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if not self.head_dim and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}), or head_dim given")
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if not self.intermediate_size:
            hidden = int(2 * 4 * self.dim / 3)
            self.intermediate_size = 256 * ((hidden + 255) // 256)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self.rope_scaling = checked_rope_scaling(self.rope_scaling)
        if self.n_experts and not 1 <= self.n_active_experts <= self.n_experts:
            raise ValueError(f"n_active_experts ({self.n_active_experts}) must be in 1..n_experts ({self.n_experts})")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        family = cfg.get("model_type")
        if family not in HF_FAMILIES:
            raise ValueError(f"unsupported model_type {family!r}: supported are {', '.join(HF_FAMILIES)}")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("unsupported variant: needs hidden_act=silu and no attention_bias or mlp_bias")
        if family.startswith("qwen") and cfg.get("use_sliding_window"):
            raise ValueError("use_sliding_window (Qwen's per-layer sliding window) is not supported")
        if family == "qwen3_moe" and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1):
            raise ValueError("mlp_only_layers / decoder_sparse_step (dense layers between MoE ones) are not supported")
        # transformers 5 keeps RoPE settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if cfg.get("rope_parameters") and cfg.get("rope_scaling") and \
                checked_rope_scaling(cfg["rope_parameters"]) != checked_rope_scaling(cfg["rope_scaling"]):
            raise ValueError("rope_parameters and rope_scaling disagree (transformers 5 reads the one, older code the "
                             "other): keep one")
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        scaling = checked_rope_scaling(rope)  # as model_config.json's is checked

        def get(key: str, kind: type = int, default=None):
            return hf_field(cfg, key, kind, default)

        heads = get("num_attention_heads")
        return cls(dim=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=heads,
                   n_kv_heads=get("num_key_value_heads", int, heads), vocab_size=get("vocab_size"),
                   intermediate_size=get("moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"),
                   head_dim=get("head_dim", int, 0),
                   norm_eps=get("rms_norm_eps", float, 1e-5), rope_theta=checked_field("rope_theta", theta, float, 0.0),
                   rope_scaling=scaling, max_seq_len=get("max_position_embeddings", int, 2048),
                   tie_embeddings=get("tie_word_embeddings", bool, False),
                   sliding_window=0 if family.startswith("qwen") else get("sliding_window", int, 0),
                   qkv_bias=family == "qwen2", qk_norm=family.startswith("qwen3"), **hf_moe_fields(cfg, family),
                   vocab_padded=family.startswith("qwen"))  # Qwen's tokenizers have ~270 fewer tokens than rows

    @classmethod
    def load(cls, path) -> "ModelArgs":
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError("not a JSON object of ModelArgs fields")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]} (the fields are {', '.join(f.name for f in fields(cls))})")
        if "max_seq_len" not in values:  # a default would be a guess: too short wastes the model, too long is garbage
            raise ValueError("no max_seq_len: give the model's context (max_position_embeddings in its config.json)")
        return cls(**values)

    def save(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PRESETS = {
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, intermediate_size=768, max_seq_len=256),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, intermediate_size=1376, max_seq_len=1024),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, intermediate_size=2048, max_seq_len=1024),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate_size=5632),
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008, max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, intermediate_size=13824, max_seq_len=4096),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672, max_seq_len=4096),
    "codellama-7b": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008, vocab_size=32016,
                         rope_theta=1e6, max_seq_len=16384),
    "codellama-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, intermediate_size=22016,
                          rope_theta=1e6, max_seq_len=16384),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336, max_seq_len=32768),
    "mixtral-8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336, n_experts=8,
                         n_active_experts=2, rope_theta=1e6, max_seq_len=32768),
    # a small MoE for benchmarks on a laptop-sized machine: 8 experts of stories110M's FFN, 2 active
    "moe-8x110m": dict(dim=768, n_layers=12, n_heads=12, intermediate_size=2048, n_experts=8, n_active_experts=2,
                       max_seq_len=1024),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336, vocab_size=128256,
                       rope_theta=5e5, max_seq_len=8192),
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672, vocab_size=128256,
                        rope_theta=5e5, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336, vocab_size=128256,
                         rope_theta=5e5, max_seq_len=131072, rope_scaling=dict(_LLAMA3_ROPE, rope_type="llama3")),
    "llama-3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672, vocab_size=128256,
                          rope_theta=5e5, max_seq_len=131072, rope_scaling=dict(_LLAMA3_ROPE, rope_type="llama3")),
    "llama-3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, intermediate_size=53248,
                           vocab_size=128256, rope_theta=5e5, max_seq_len=131072,
                           rope_scaling=dict(_LLAMA3_ROPE, rope_type="llama3")),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192, vocab_size=128256,
                         head_dim=64, rope_theta=5e5, max_seq_len=131072, tie_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0, rope_type="llama3")),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, intermediate_size=8192, vocab_size=128256,
                         head_dim=128, rope_theta=5e5, max_seq_len=131072, tie_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0, rope_type="llama3")),
}
