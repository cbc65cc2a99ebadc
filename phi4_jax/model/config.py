"""The model's typed configuration and the table of named Phi-4 sizes.

A `ModelConfig` is frozen and validated on construction, so a bad geometry is refused
before any parameter is built. `param_count` works from shapes alone: it is how a 14B
size is checked on a laptop. Optional parts: Phi-4-mini's LongRoPE (`long_rope`) and
low-rank adapters (`lora`, which adds parameters beside the backbone's, not in its count).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from phi4_jax.errors import Phi4Error
from phi4_jax.model.lora import LoRAConfig, LoRAConfigError, validate_lora_config
from phi4_jax.model.rope import LongRoPE

AttentionImpl = Literal["auto", "xla", "blockwise", "cudnn", "pallas_triton", "tokamax", "splash"]
# `auto` is resolved at start-up (train.state.build_run) to the cheapest policy whose memory
# estimate fits; the model itself runs only the concrete ones.
RematPolicy = Literal["auto", "none", "save_dots", "save_qkv_proj", "full"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Geometry and numerics of a Phi-4-family decoder."""

    name: str
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int = 4096
    rope_theta: float = 10_000.0
    rotary_fraction: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention_impl: AttentionImpl = "auto"
    attention_block_size: int = 512
    # The most documents (segments) one row holds; the packer enforces it (the run config's
    # data.max_segments_per_row) and cuDNN's packed attention compiles it in.
    max_segments_per_row: int = 32
    remat_policy: RematPolicy = "none"
    # Layers per iteration of the layer loop: 1 a rolled scan (compile time per layer),
    # num_layers no loop at all; 0 resolves per backend (`transformer.scan_unroll`).
    scan_unroll: int = 0
    init_std: float = 0.02
    long_rope: LongRoPE | None = None  # Phi-4-mini's rescaled frequencies; None: plain RoPE
    lora: LoRAConfig | None = None  # adapters beside the weights; None: none

    def __post_init__(self) -> None:
        validate_model_config(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


class ModelConfigError(Phi4Error, ValueError):
    """A model configuration that cannot be built; the message names the field and the fix."""


def validate_model_config(cfg: ModelConfig) -> None:
    """Refuses impossible geometries with a message naming the field and the fix."""
    positive = ("num_layers", "d_model", "num_heads", "num_kv_heads", "ffn_dim", "vocab_size",
                "max_positions", "attention_block_size", "max_segments_per_row")
    for field in positive:
        value = getattr(cfg, field)
        if not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"model.{field}={value!r} must be a positive integer.")
    if cfg.d_model % cfg.num_heads:
        raise ModelConfigError(
            f"model.num_heads={cfg.num_heads} does not divide model.d_model={cfg.d_model}; "
            f"pick num_heads from the divisors of d_model (head_dim = d_model / num_heads).")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ModelConfigError(
            f"model.num_kv_heads={cfg.num_kv_heads} does not divide "
            f"model.num_heads={cfg.num_heads}; grouped attention needs an equal number of query "
            f"heads per KV head, so pick num_kv_heads from the divisors of num_heads.")
    if not 0.0 < cfg.rotary_fraction <= 1.0:
        raise ModelConfigError(
            f"model.rotary_fraction={cfg.rotary_fraction} must lie in (0, 1].")
    rotary_exact = cfg.head_dim * cfg.rotary_fraction
    if rotary_exact != int(rotary_exact) or int(rotary_exact) % 2:
        raise ModelConfigError(
            f"model.rotary_fraction={cfg.rotary_fraction} gives a rotary dimension of "
            f"{rotary_exact} for head_dim={cfg.head_dim}; RoPE rotates pairs, so choose a "
            f"fraction that makes head_dim * rotary_fraction an even integer.")
    if cfg.rope_theta <= 0:
        raise ModelConfigError(f"model.rope_theta={cfg.rope_theta} must be positive.")
    for field in ("param_dtype", "compute_dtype"):
        if getattr(cfg, field) not in ("float32", "bfloat16", "float16"):
            raise ModelConfigError(
                f"model.{field}={getattr(cfg, field)!r}: use 'float32', 'bfloat16' or 'float16'.")
    if cfg.attention_impl not in AttentionImpl.__args__:
        raise ModelConfigError(
            f"model.attention_impl={cfg.attention_impl!r}: choose one of {AttentionImpl.__args__}.")
    if cfg.remat_policy not in RematPolicy.__args__:
        raise ModelConfigError(
            f"model.remat_policy={cfg.remat_policy!r}: choose one of {RematPolicy.__args__}.")
    if (not isinstance(cfg.scan_unroll, int) or isinstance(cfg.scan_unroll, bool)
            or not 0 <= cfg.scan_unroll <= cfg.num_layers):
        raise ModelConfigError(
            f"model.scan_unroll={cfg.scan_unroll!r} must be an integer from 0 (chosen per "
            f"backend) to model.num_layers={cfg.num_layers} (no layer loop).")
    if cfg.long_rope is not None:
        _validate_long_rope(cfg)
    if cfg.lora is not None:
        try:
            validate_lora_config(cfg.lora)
        except LoRAConfigError as error:
            raise ModelConfigError(str(error)) from error


def _validate_long_rope(cfg: ModelConfig) -> None:
    rope, pairs = cfg.long_rope, cfg.rotary_dim // 2
    for name in ("short_factor", "long_factor"):
        factors = getattr(rope, name)
        if len(factors) != pairs or not all(isinstance(f, float) and f > 0 for f in factors):
            raise ModelConfigError(
                f"model.long_rope.{name} has {len(factors)} entries; LongRoPE needs one "
                f"positive float per rotary pair: rotary_dim / 2 = {pairs}.")
    if not 0 < rope.original_max_positions <= rope.max_positions:
        raise ModelConfigError(
            f"model.long_rope: original_max_positions={rope.original_max_positions} must be "
            f"positive and at most max_positions={rope.max_positions}.")
    if cfg.max_positions > rope.max_positions:
        raise ModelConfigError(
            f"model.max_positions={cfg.max_positions} exceeds the {rope.max_positions} "
            f"positions the LongRoPE factors were fitted for; lower model.max_positions.")
    if rope.attention_factor is not None and not rope.attention_factor > 0:
        raise ModelConfigError(f"model.long_rope.attention_factor={rope.attention_factor} must "
                               f"be positive (or None for the default).")


# microsoft/Phi-4-mini-instruct config.json, `rope_scaling` (type longrope): one factor per
# rotary pair (96 / 2), the short ones all 1.0, and the lengths that choose between them.
PHI4_MINI_LONG_ROPE = LongRoPE(
    short_factor=(1.0,) * 48,
    long_factor=(1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897,
                 1.956131817, 2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075,
                 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555,
                 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651,
                 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418,
                 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
                 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77),
    original_max_positions=4096, max_positions=131072)
# mini-tiny's LongRoPE: illustrative factors (not released numbers) rising like the release's,
# with an original context of 128 so a CPU run crosses it, extended to the run configs'
# default 4096 positions.
MINI_TINY_LONG_ROPE = LongRoPE(short_factor=(1.0,) * 6, long_factor=(1.0, 1.5, 2.5, 4.0, 6.0, 8.0),
                               original_max_positions=128, max_positions=4096)

# Named sizes. phi4-14b and phi4-mini are the released geometries (rope base of the
# released 16K phi-4; the 4K pretraining base is set by configs/pretrain.py). The research
# sizes keep Phi-4's vocabulary and head layout at smaller width and depth; mini-tiny is
# Phi-4-mini's (o200k vocabulary, 0.75 rotary fraction, tied head, LongRoPE) at tiny width;
# toy is tiny's body on the 512-id `bytes` tokenizer (tiny is 99% vocabulary), for tests and
# CPU experiments where a step should take milliseconds.
_SIZES: dict[str, dict] = {
    "phi4-14b": dict(num_layers=40, d_model=5120, num_heads=40, num_kv_heads=10, ffn_dim=17920,
                     vocab_size=100352, max_positions=16384, rope_theta=250_000.0),
    "phi4-mini": dict(num_layers=32, d_model=3072, num_heads=24, num_kv_heads=8, ffn_dim=8192,
                      vocab_size=200064, max_positions=131072, rope_theta=10_000.0,
                      rotary_fraction=0.75, tie_embeddings=True, long_rope=PHI4_MINI_LONG_ROPE),
    # phi4-14b layer geometry with 4 layers: single-GPU benchmarks of the real layer.
    "phi4-14b-4l": dict(num_layers=4, d_model=5120, num_heads=40, num_kv_heads=10, ffn_dim=17920,
                        vocab_size=100352, max_positions=16384, rope_theta=250_000.0),
    "1b": dict(num_layers=16, d_model=2048, num_heads=16, num_kv_heads=4, ffn_dim=5632,
               vocab_size=100352, max_positions=4096),
    # GPT-3 Small geometry (85M non-embedding parameters; ~240M with Phi-4's vocabulary).
    "125m": dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=4, ffn_dim=2048,
                 vocab_size=100352, max_positions=4096),
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=192,
                 vocab_size=100352, max_positions=1024),
    "toy": dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=192,
                vocab_size=512, max_positions=1024),
    "mini-tiny": dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=192,
                      vocab_size=200064, max_positions=4096, rotary_fraction=0.75,
                      tie_embeddings=True, long_rope=MINI_TINY_LONG_ROPE),
}

SIZE_NAMES: tuple[str, ...] = tuple(_SIZES)


def model_config_for(size: str, **overrides) -> ModelConfig:
    """Builds the named size, with field overrides (dtype, rope base, attention, ...)."""
    if size not in _SIZES:
        raise ModelConfigError(
            f"model.size={size!r} is not a known size; choose one of {', '.join(SIZE_NAMES)}.")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelConfigError(f"unknown model field(s) {unknown}; known fields: {sorted(fields)}.")
    return ModelConfig(name=size, **{**_SIZES[size], **overrides})


def to_record(cfg: ModelConfig) -> dict:
    """The config as JSON-ready fields: what a checkpoint records of the model that wrote it."""
    return dataclasses.asdict(cfg)


def from_record(record: dict) -> ModelConfig:
    """The config `to_record` wrote (lists back to tuples), validated as any other."""
    fields = dict(record)
    if fields.get("long_rope") is not None:
        rope = fields["long_rope"]
        fields["long_rope"] = LongRoPE(**{**rope, "short_factor": tuple(rope["short_factor"]),
                                          "long_factor": tuple(rope["long_factor"])})
    if fields.get("lora") is not None:
        adapters = fields["lora"]
        fields["lora"] = LoRAConfig(**{**adapters, "targets": tuple(adapters["targets"]),
                                       "adapters": tuple(adapters["adapters"])})
    return ModelConfig(**fields)


def param_count(cfg: ModelConfig, *, include_embeddings: bool = True) -> int:
    """Parameters implied by the geometry: fused QKV, output, SwiGLU, two norms per layer."""
    d, h, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    attention = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * h + cfg.num_heads * h * d
    per_layer = attention + 3 * d * f + 2 * d
    total = cfg.num_layers * per_layer + d  # final norm
    if include_embeddings:
        total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return total
