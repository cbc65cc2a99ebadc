"""Low-rank adapters (LoRA, Hu et al. 2021) beside a frozen decoder, several named ones at once.

An adapted projection `x -> x W` becomes `x W + scale * (x A_j) B_j`, with `scale = alpha /
rank` and `j` the adapter a batch row selects (Phi-4-multimodal routes each input to its
modality's adapter this way). Axes as in the model, plus J adapters and R the rank:
A is [J, in..., R], uniform in +-1/sqrt(fan_in) as in the reference implementation, and B
is [J, R, out...], zero, so a fresh adapter leaves the model exactly as it was.

Adapter weights are `nnx.LoRAParam`s (a kind of `nnx.Param`) in the same module tree as the
backbone's: `nnx.split(model, nnx.LoRAParam, nnx.Param)` separates the two, `join` puts the
pure-dict halves back together for `nnx.merge`. Training takes gradients of the adapters
alone, with the backbone as a constant. `merged` folds one adapter into the base weights
for export, so `interop.hf_checkpoint.save_hf_checkpoint` writes an ordinary checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from phi4_jax.errors import Phi4Error


@dataclasses.dataclass(frozen=True)
class Target:
    """An adaptable projection: its module, weight and the einsum letters of its in and out
    axes (d model, n query heads, k kv heads, h head dim, f ffn)."""

    module: str
    weight: str
    in_axes: str
    out_axes: str


TARGETS: dict[str, Target] = {
    "q": Target("attn", "q_DNH", "d", "nh"),
    "k": Target("attn", "k_DKH", "d", "kh"),
    "v": Target("attn", "v_DKH", "d", "kh"),
    "o": Target("attn", "o_NHD", "nh", "d"),
    "gate": Target("mlp", "gate_DF", "d", "f"),
    "up": Target("mlp", "up_DF", "d", "f"),
    "down": Target("mlp", "down_FD", "f", "d"),
}
# Axis letter -> (the ModelConfig size it has, its logical name for sharding).
_AXES = {"d": ("d_model", "embed"), "n": ("num_heads", "q_heads"),
         "k": ("num_kv_heads", "kv_heads"), "h": ("head_dim", "head_dim"), "f": ("ffn_dim", "mlp")}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections carry adapters, their rank and alpha, the adapters' names, and the
    dtype the frozen backbone is held in ('' = the model's param_dtype)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    adapters: tuple[str, ...] = ("default",)
    backbone_dtype: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAConfigError(Phi4Error, ValueError):
    """An adapter configuration that cannot be built; the message names the key and the fix."""


def validate_lora_config(cfg: LoRAConfig) -> None:
    """Refuses a rank, alpha, target or adapter list that cannot work, naming the key."""
    if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise LoRAConfigError(f"lora.rank={cfg.rank!r} must be a positive integer (0 turns "
                              f"adapters off in the run config).")
    if not (isinstance(cfg.alpha, (int, float)) and math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise LoRAConfigError(f"lora.alpha={cfg.alpha!r} must be a positive number "
                              f"(the update is scaled by alpha / rank).")
    unknown = [t for t in cfg.targets if t not in TARGETS]
    if not cfg.targets or unknown or len(set(cfg.targets)) != len(cfg.targets):
        raise LoRAConfigError(f"lora.targets={tuple(cfg.targets)!r}: give distinct projections "
                              f"from {tuple(TARGETS)}.")
    names = cfg.adapters
    if not names or len(set(names)) != len(names) or not all(
            isinstance(n, str) and n for n in names):
        raise LoRAConfigError(f"lora.adapters={tuple(names)!r}: give one or more distinct, "
                              f"non-empty names.")
    if cfg.backbone_dtype not in ("", "float32", "bfloat16", "float16"):
        raise LoRAConfigError(f"lora.backbone_dtype={cfg.backbone_dtype!r}: use '' (the "
                              f"param_dtype), 'float32', 'bfloat16' or 'float16'.")


def _dims(cfg: Any, letters: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Sizes and logical names of einsum axes, read from a ModelConfig."""
    return (tuple(getattr(cfg, _AXES[c][0]) for c in letters),
            tuple(_AXES[c][1] for c in letters))


class Adapter(nnx.Module):
    """J low-rank updates of one projection; `a` [J, in..., R], `b` [J, R, out...]."""

    def __init__(self, target: str, cfg: Any, rngs: nnx.Rngs):
        spec, lora = TARGETS[target], cfg.lora
        in_shape, in_names = _dims(cfg, spec.in_axes)
        out_shape, out_names = _dims(cfg, spec.out_axes)
        j, r, dtype = len(lora.adapters), lora.rank, cfg.param_dtype
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), (j, *in_shape, r), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a.astype(dtype), out_sharding=("adapters", *in_names, "lora_rank"),
                               eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((j, r, *out_shape), dtype),
                               out_sharding=("adapters", "lora_rank", *out_names),
                               eager_sharding=False)
        i, o = spec.in_axes, spec.out_axes
        self.shared = (f"bt{i},{i}r->btr", f"btr,r{o}->bt{o}")  # one adapter for all rows
        self.per_row = (f"bt{i},b{i}r->btr", f"btr,br{o}->bt{o}")  # each row its own
        self.scale = lora.scale

    def __call__(self, x: jax.Array, adapter_ids_B: jax.Array | None) -> jax.Array:
        """scale * (x A_j) B_j for each row's adapter j: adapter 0 for every row when
        `adapter_ids_B` is None, none for rows whose id is negative."""
        dt = x.dtype
        if adapter_ids_B is None:
            to_a, to_b = self.shared
            h = jnp.einsum(to_a, x, self.a[0].astype(dt))
            return jnp.einsum(to_b, h, self.b[0].astype(dt)) * self.scale
        to_a, to_b = self.per_row
        chosen = jnp.maximum(adapter_ids_B, 0)
        h = jnp.einsum(to_a, x, self.a[...][chosen].astype(dt))
        h = h * (adapter_ids_B >= 0)[:, None, None].astype(dt)
        return jnp.einsum(to_b, h, self.b[...][chosen].astype(dt)) * self.scale


def adapters_for(module: str, cfg: Any, rngs: nnx.Rngs) -> nnx.Dict:
    """The adapters of one module ('attn' or 'mlp') the config asks for, by target name."""
    targets = cfg.lora.targets if cfg.lora is not None else ()
    return nnx.Dict({t: Adapter(t, cfg, rngs) for t in targets if TARGETS[t].module == module})


def project(x: jax.Array, kernel: nnx.Param, equation: str, adapters: Mapping[str, Adapter],
            target: str, adapter_ids_B: jax.Array | None, *,
            plain_weight_grad: bool = False) -> jax.Array:
    """`x` through a projection's kernel, plus its adapter's update when it has one;
    `plain_weight_grad` makes the kernel's gradient a plain dot (`einsum_plain_weight_grad`)."""
    einsum = einsum_plain_weight_grad if plain_weight_grad else jnp.einsum
    y = einsum(equation, x, kernel[...].astype(x.dtype))
    adapter = adapters.get(target)
    return y if adapter is None else y + adapter(x, adapter_ids_B)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_plain_weight_grad(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, w)` for a projection `bt<in>,<in><out>->bt<out>`, whose
    gradient for `w` copies the smaller of `x` and the output gradient to its transposed
    layout first, so the gradient is a plain dot. XLA CPU otherwise runs `x^T @ dy` by copying
    an operand of its own choosing, at 1.3x torch's time for the same product, against 0.8x
    that with the smaller one copied (`benchmarks/cpu_dots.py`)."""
    return jnp.einsum(equation, x, w)


def _einsum_forward(equation: str, x: jax.Array, w: jax.Array):
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    if not (lhs[:2] == out[:2] == "bt" and rhs == lhs[2:] + out[2:]):
        raise ValueError(f"{equation!r} is not a projection 'bt<in>,<in><out>->bt<out>'")
    return jnp.einsum(equation, x, w), (x, w)


def _einsum_backward(equation: str, residuals, dy: jax.Array):
    x, w = residuals
    (dx,) = jax.vjp(lambda x_: jnp.einsum(equation, x_, w), x)[1](dy)
    x_NI = x.reshape(x.shape[0] * x.shape[1], -1)
    dy_NO = dy.reshape(x_NI.shape[0], -1)
    copy = jax.lax.optimization_barrier  # keeps XLA from folding the transpose into the dot
    if x_NI.shape[1] <= dy_NO.shape[1]:
        dw_IO = copy(x_NI.T) @ dy_NO
    else:
        dw_IO = (copy(dy_NO.T) @ x_NI).T
    return dx, dw_IO.reshape(w.shape)


einsum_plain_weight_grad.defvjp(_einsum_forward, _einsum_backward)


def split(params: Mapping) -> tuple[dict, dict]:
    """(adapters, backbone): a pure-dict parameter tree cut at its `adapters` entries, the
    trained half and the frozen half, each a nested dict of the same structure."""
    adapters, backbone = {}, {}
    for key, value in params.items():
        if key == "adapters":
            adapters[key] = value
        elif isinstance(value, Mapping):
            inner_adapters, backbone[key] = split(value)
            if inner_adapters:
                adapters[key] = inner_adapters
        else:
            backbone[key] = value
    return adapters, backbone


def zeroed(adapters: Any) -> Any:
    """Adapters whose update is exactly zero: the backbone's own forward, with no weight copy."""
    return jax.tree.map(jnp.zeros_like, adapters)


def as_backbone(params: Mapping) -> dict:
    """The whole model's parameters with every adapter zeroed: the frozen backbone's own
    forward (a DPO or KL reference) from the same arrays, no copy of its weights."""
    adapters, backbone = split(params)
    return join(zeroed(adapters), backbone)


def join(adapters: Mapping, backbone: Mapping) -> dict:
    """One parameter tree (nested dicts) from the adapter and backbone halves."""
    joined = dict(backbone)
    for key, value in adapters.items():
        joined[key] = join(value, backbone.get(key, {})) if isinstance(value, Mapping) else value
    return joined


def merged(params: Mapping, lora: LoRAConfig, adapter: str) -> dict:
    """The backbone with one adapter's update folded into its weights, the adapters dropped:
    `W + scale * A_j B_j` per adapted projection, summed in float32."""
    if adapter not in lora.adapters:
        raise LoRAConfigError(f"adapter {adapter!r} is not one of lora.adapters={lora.adapters}.")
    j = lora.adapters.index(adapter)
    blocks = dict(params["blocks"])
    for module in ("attn", "mlp"):
        layer = dict(blocks[module])
        for target, ab in layer.pop("adapters", {}).items():
            spec = TARGETS[target]
            update = jnp.einsum(f"l{spec.in_axes}r,lr{spec.out_axes}->l{spec.in_axes}{spec.out_axes}",
                                jnp.asarray(ab["a"][:, j], jnp.float32),
                                jnp.asarray(ab["b"][:, j], jnp.float32))
            weight = layer[spec.weight]
            layer[spec.weight] = (weight.astype(jnp.float32) + lora.scale * update).astype(
                weight.dtype)
        blocks[module] = layer
    return {**params, "blocks": blocks}


def adapter_param_count(cfg: Any) -> int:
    """Adapter parameters of a ModelConfig (0 without LoRA): J * R * (in + out) per target
    and layer."""
    if cfg.lora is None:
        return 0
    per_layer = sum(math.prod(_dims(cfg, TARGETS[t].in_axes)[0])
                    + math.prod(_dims(cfg, TARGETS[t].out_axes)[0]) for t in cfg.lora.targets)
    return cfg.num_layers * len(cfg.lora.adapters) * cfg.lora.rank * per_layer
