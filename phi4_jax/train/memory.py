"""Per-device training memory estimated from shapes, before anything is compiled or allocated.

The point is to refuse a run that cannot fit in a second, with the change that would make it
fit, instead of after minutes of compilation or an out-of-memory crash. It is an estimate
(XLA's temporaries, fusion and fragmentation are not modelled; `check_fits` keeps headroom
for them). The assumptions, per device:

- parameters: `param_count(cfg)` in `param_dtype`, sharded over fsdp * tensor (embedding
  and LM head included), replicated over data;
- gradients: float32, same sharding; with microbatches > 1 a second float32 copy for the
  accumulation buffer;
- optimizer: AdamW's two float32 moments, same sharding;
- frozen: what the loss reads but never trains, sharded like the parameters: the stage's
  frozen state (`frozen_bytes` over all devices, e.g. the reference model of full-weight DPO
  and GRPO) and, with LoRA, the backbone;
- with LoRA (`cfg.lora`) those three count the adapters alone (`lora.adapter_param_count`,
  in param_dtype, taken as sharded like the backbone), and the frozen backbone is its own
  component, `param_count(cfg)` in `lora.backbone_dtype`, with no gradient or moment; the
  adapters' [tokens, rank] intermediates are left out (rank << D);
- activations, for `per_device_batch` rows of `seq_len` tokens: what each layer keeps for
  the backward under its remat policy;
- backward: the larger of two working sets that are never live together: the layer whose
  backward is in flight (its residuals once more without remat, 1.5x with remat: recomputed
  forward plus gradients), and the loss's (below).
  Without remat a layer keeps (the residuals JAX saves for model.py) its input, both norm
  inputs in float32, RoPE'd q and k, v, the MLP gate, up and silu's three intermediates,
  and for attention: `xla` a bool mask, float32 masked logits and exp, and compute-dtype
  probabilities, each [N, T, S]; `blockwise` a float32 output and log-sum-exp, plus
  float32 [N, block, block] tiles while it runs; fused kernels the output and softmax
  statistics (cuDNN's packed layout one row per segment slot: M = max_segments_per_row),
  plus K/V repeated to the query heads where the path needs it (pallas_triton; cudnn
  packed on JAX without PR #39521). When param_dtype differs from compute_dtype it also keeps every
  layer's cast weights. `full` remat keeps only each layer's input; `save_dots` its input
  and the projection outputs (q/k/v, output, gate, up, down); `save_qkv_proj` its input
  and q/k/v. Head and MLP widths are divided by the tensor axis; the D-wide residual
  stream is not. Positions are divided by the sequence axis (context parallelism), whose
  attention also holds the whole row's gathered K/V and their float32 gradients in flight. On the CPU test configs this lands within about a third of XLA's own
  memory analysis (tests/test_memory.py);
  The loss forms the logits in chunks of `loss_chunk_tokens` positions
  (`losses.lm.chunked_token_log_probs`): float32 [chunk, V] per row, vocab sharded over
  tensor, twice while a chunk's backward runs (the logits and their gradient, into which
  XLA fuses the softmax; XLA's CPU analysis agrees within a few percent). Under remat
  `none` the chunks are not recomputed: every chunk's float32 logits are kept for the
  backward and counted with the activations.
- workspace: cuDNN's flash-attention backward scratch, live while one layer's attention
  backward runs (`cudnn_workspace_bytes`). cudnn-frontend's SDPA backward node
  (`include/cudnn_frontend/node/scaled_dot_product_flash_attention.h`) names the buffers: a
  float32 dQ accumulator [b, N, T, H], dK and dV expanded to all N query heads [b, N, T, H]
  (grouped KV heads) and a float32 softmax sum [b, N, T]. The packed layout runs b = B x M
  sequences of T tokens (every segment slot is sized for the whole row), the one-document
  path b = B. Counting 4 bytes (dQ) + 2 x 2 (dK, dV in bf16) per element and 8 per row
  (the softmax sum and one more float32; the second is inferred from the measurement, not
  read in the source) gives 8 x B x M x N x T x (H + 1) bytes, exactly what the packed call
  with M = T asked an H200 for (GPU_NOTES, 40 heads of 128): 645 GiB at T=4096, 10 TiB at
  T=16384. M is `max_segments_per_row`, the packer's bound (1 for rows of one document).

`model.remat_policy="auto"` is resolved here (`resolve_remat`): the cheapest policy in
`REMAT_BY_COST` whose estimate fits. Cheapest means least recomputation: `none`, then
`save_dots` (recomputes elementwise work and attention), `save_qkv_proj` (also the output
projection and MLP), `full` (the whole layer forward).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import jax

from phi4_jax.errors import Phi4Error

from phi4_jax.model import attention as attention_lib
from phi4_jax.model.attention import cudnn
from phi4_jax.model.config import SIZE_NAMES, ModelConfig, model_config_for, param_count
from phi4_jax.model.lora import adapter_param_count
from phi4_jax.parallel.sharding import MESH_AXES

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FLOAT32 = 4
_ADAM_MOMENTS = 2
_LOGITS_COPIES = 2
REMAT_BY_COST = ("none", "save_dots", "save_qkv_proj", "full")
_BLOCKWISE_TILES = 4  # logits, probabilities and their two gradients per (query, key) block
_MAX_FSDP_GROWTH = 1024
# A remat layer's backward holds its recomputed forward and the gradients flowing through
# it: about 1.5 layers' residuals in XLA's memory analysis of the CPU tests' configs.
_REMAT_IN_FLIGHT = 1.5
HEADROOM = 0.9  # the share of a device's memory an estimate may fill (XLA's own temporaries)


@dataclasses.dataclass(frozen=True)
class TrainMemoryInputs:
    """What an estimate was made for: re-estimated with one change to suggest fixes."""

    cfg: ModelConfig
    seq_len: int
    per_device_batch: int
    microbatches: int
    data: int
    fsdp: int
    tensor: int
    loss_chunk_tokens: int = 1024
    sequence: int = 1
    frozen_bytes: int = 0  # the stage's frozen state over all devices (a reference model)

    def describe(self) -> str:
        impl = _resolved_attention(self.cfg, self.seq_len)
        return (f"{self.cfg.name}, seq {self.seq_len}, {self.per_device_batch} row(s)/device x "
                f"{self.microbatches} microbatch(es), remat {self.cfg.remat_policy}, attention "
                f"{impl}, mesh data={self.data} fsdp={self.fsdp} sequence={self.sequence} "
                f"tensor={self.tensor}")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per device by component; `total` is their sum."""

    params: int
    grads: int
    optimizer: int
    activations: int
    backward: int
    inputs: TrainMemoryInputs
    frozen: int = 0  # the stage's frozen state, and a LoRA run's backbone
    workspace: int = 0  # cuDNN attention's backward scratch
    total: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        parts = (self.params, self.frozen, self.grads, self.optimizer, self.activations,
                 self.backward, self.workspace)
        object.__setattr__(self, "total", sum(parts))

    def describe(self) -> str:
        """A small table in GiB per device, headed by what it was estimated for."""
        rows = [("params", self.params), *([("frozen", self.frozen)] if self.frozen else []),
                ("grads", self.grads), ("optimizer", self.optimizer),
                ("activations", self.activations), ("backward", self.backward),
                *([("workspace", self.workspace)] if self.workspace else []),
                ("total", self.total)]
        lines = [f"estimate for {self.inputs.describe()}:",
                 f"  {'component':<12}{'GiB/device':>12}"]
        lines += [f"  {name:<12}{size / GIB:>12.2f}" for name, size in rows]
        return "\n".join(lines)


class MemoryBudgetError(Phi4Error, RuntimeError):
    """The estimated per-device memory exceeds the device; the message says what to change."""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer.")


def estimate_train_memory(cfg: ModelConfig, *, seq_len: int, per_device_batch: int,
                          mesh_shape: Mapping[str, int], microbatches: int = 1,
                          loss_chunk_tokens: int = 1024, frozen_bytes: int = 0) -> MemoryEstimate:
    """Bytes per device for one training step; `per_device_batch` rows are live at once."""
    _check_positive(seq_len=seq_len, per_device_batch=per_device_batch, microbatches=microbatches,
                    loss_chunk_tokens=loss_chunk_tokens)
    if cfg.remat_policy == "auto":
        raise ValueError("remat_policy='auto' has no single estimate; resolve it first with "
                         "phi4_jax.train.memory.resolve_remat.")
    sizes = {axis: mesh_shape.get(axis) for axis in MESH_AXES}
    if set(mesh_shape) != set(MESH_AXES) or not all(
            isinstance(s, int) and s > 0 for s in sizes.values()):
        raise ValueError(
            f"mesh_shape={dict(mesh_shape)} must give a positive size for each of {MESH_AXES}; "
            f"fill a -1 first with phi4_jax.sharding.resolve_mesh_shape.")
    return _estimate(TrainMemoryInputs(cfg, seq_len, per_device_batch, microbatches, **sizes,
                                       loss_chunk_tokens=loss_chunk_tokens,
                                       frozen_bytes=frozen_bytes))


def resolve_remat(inputs: TrainMemoryInputs, budget_bytes: float) -> str:
    """The cheapest policy in `REMAT_BY_COST` whose estimate fits the budget; `full` (the
    most frugal) when none does, so the fit check then explains what else to change."""
    for policy in REMAT_BY_COST:
        if _total(dataclasses.replace(inputs, cfg=inputs.cfg.replace(remat_policy=policy))
                  ) <= budget_bytes:
            return policy
    return "full"


def _estimate(inputs: TrainMemoryInputs) -> MemoryEstimate:
    cfg = inputs.cfg
    state_shards = inputs.fsdp * inputs.tensor
    trained = adapter_param_count(cfg) if cfg.lora else param_count(cfg)
    frozen = inputs.frozen_bytes + _backbone_bytes(cfg)
    grad_copies = 2 if inputs.microbatches > 1 else 1
    saved, in_flight = _activation_bytes(inputs)
    return MemoryEstimate(
        params=math.ceil(trained * _DTYPE_BYTES[cfg.param_dtype] / state_shards),
        frozen=math.ceil(frozen / state_shards),
        grads=grad_copies * math.ceil(trained * _FLOAT32 / state_shards),
        optimizer=math.ceil(_ADAM_MOMENTS * trained * _FLOAT32 / state_shards),
        activations=math.ceil(saved),
        backward=math.ceil(max(in_flight, loss_chunk_bytes(inputs))),
        workspace=_attention_workspace(inputs), inputs=inputs)


def cudnn_workspace_bytes(*, rows: int, slots: int, heads: int, seq_len: int, head_dim: int,
                          compute_dtype: str) -> int:
    """cuDNN's flash-attention backward scratch for one call (module docstring): a float32
    dQ accumulator and full-head dK/dV per element, two float32 per row, for `rows` x
    `slots` sequences of `seq_len` tokens."""
    per_element = _FLOAT32 + 2 * _DTYPE_BYTES[compute_dtype]
    return rows * slots * heads * seq_len * (per_element * head_dim + 2 * _FLOAT32)


def _attention_workspace(inputs: TrainMemoryInputs) -> int:
    """The cuDNN backward scratch of one layer (context parallelism runs blockwise)."""
    cfg = inputs.cfg
    if inputs.sequence > 1 or _resolved_attention(cfg, inputs.seq_len) != "cudnn":
        return 0
    return math.ceil(cudnn_workspace_bytes(
        rows=inputs.per_device_batch, slots=cfg.max_segments_per_row,
        heads=math.ceil(cfg.num_heads / inputs.tensor), seq_len=inputs.seq_len,
        head_dim=cfg.head_dim, compute_dtype=cfg.compute_dtype))


def _backbone_bytes(cfg: ModelConfig) -> int:
    """A LoRA run's frozen backbone (0 without LoRA)."""
    if not cfg.lora:
        return 0
    return param_count(cfg) * _DTYPE_BYTES[cfg.lora.backbone_dtype or cfg.param_dtype]


def loss_chunk_bytes(inputs: TrainMemoryInputs) -> int:
    """The loss's backward working set: one chunk's float32 logits, twice."""
    chunk = min(inputs.loss_chunk_tokens, inputs.seq_len)
    return (inputs.per_device_batch * chunk * math.ceil(inputs.cfg.vocab_size / inputs.tensor)
            * _FLOAT32 * _LOGITS_COPIES)


def _resolved_attention(cfg: ModelConfig, seq_len: int) -> str:
    return attention_lib.resolve_impl(cfg.attention_impl, seq_len, cfg.attention_block_size,
                                      cfg.compute_dtype)


def _activation_bytes(inputs: TrainMemoryInputs) -> tuple[float, float]:
    """Saved activations of every layer, and one layer's backward working set."""
    cfg, t = inputs.cfg, inputs.tensor
    c = _DTYPE_BYTES[cfg.compute_dtype]
    # Under context parallelism each device runs blockwise attention on its positions.
    impl = "blockwise" if inputs.sequence > 1 else _resolved_attention(cfg, inputs.seq_len)
    layer = _layer_bytes_per_token(cfg, inputs.seq_len, t, impl)
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim / t
    saved = {"none": layer, "full": 0.0, "save_qkv_proj": c * qkv,
             "save_dots": c * (qkv + 2 * cfg.d_model + 2 * cfg.ffn_dim / t)}[cfg.remat_policy]
    saved += c * cfg.d_model  # the layer input: the scan carry
    in_flight = layer * (1.0 if cfg.remat_policy == "none" else _REMAT_IN_FLIGHT)
    tokens = inputs.per_device_batch * inputs.seq_len / inputs.sequence
    saved, in_flight = tokens * cfg.num_layers * saved, tokens * in_flight
    if cfg.remat_policy == "none":  # the loss keeps every chunk's float32 logits (losses.lm)
        saved += tokens * math.ceil(cfg.vocab_size / t) * _FLOAT32
    if inputs.sequence > 1:  # the row's K and V gathered, and their float32 gradients
        kv_row = inputs.per_device_batch * inputs.seq_len * 2 * cfg.num_kv_heads / t * cfg.head_dim
        in_flight += kv_row * (c + _FLOAT32)
    if impl == "blockwise":
        block = min(cfg.attention_block_size, inputs.seq_len // (2 * inputs.sequence))
        in_flight += (inputs.per_device_batch * cfg.num_heads / t * block**2 * _FLOAT32
                      * _BLOCKWISE_TILES)
    if cfg.remat_policy == "none" and cfg.param_dtype != cfg.compute_dtype:
        weights = param_count(cfg, include_embeddings=False) - cfg.d_model  # all but the final norm
        saved += weights * c / (inputs.fsdp * t)  # each layer's cast weights
    return saved, in_flight


def _layer_bytes_per_token(cfg: ModelConfig, seq_len: int, tensor: int, impl: str) -> float:
    """What one layer keeps for its backward without remat, besides its input."""
    c = _DTYPE_BYTES[cfg.compute_dtype]
    heads = cfg.num_heads / tensor
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim / tensor
    # Both norms' inputs in float32; with float32 compute the first is the layer input.
    norm_inputs = _FLOAT32 * cfg.d_model * (1 if c == _FLOAT32 else 2)
    mlp = c * 5 * cfg.ffn_dim / tensor  # gate, up and silu's three intermediates
    if impl == "xla":  # per [N, S] row: bool mask, float32 masked logits and exp, probabilities
        attention = heads * seq_len * (1 + 2 * _FLOAT32 + c)
    elif impl == "blockwise":  # float32 output and log-sum-exp
        attention = _FLOAT32 * heads * (cfg.head_dim + 1)
    else:  # fused kernels: output and softmax statistics, K/V repeated where needed
        attention = heads * (c * cfg.head_dim + _FLOAT32 * _statistics_rows(cfg, impl))
        if impl == "pallas_triton" or (impl == "cudnn" and cfg.max_segments_per_row > 1
                                       and cudnn.needs_repeated_kv()):
            attention += 2 * c * heads * cfg.head_dim
    return norm_inputs + c * qkv + attention + mlp


def _statistics_rows(cfg: ModelConfig, impl: str) -> int:
    """Float32 softmax statistics a fused kernel keeps per token and head: cuDNN's packed
    layout allocates one row per segment slot, (B*M, N, T)."""
    return cfg.max_segments_per_row if impl == "cudnn" else 1


def device_memory_bytes(device: jax.Device) -> int | None:
    """The device's usable bytes: the allocator's limit, or for CPUs a share of host RAM."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        host = _host_memory_bytes()
        return None if host is None else host // len(jax.local_devices(backend="cpu"))
    return None


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def check_fits(estimate: MemoryEstimate, capacity_bytes: int, *, headroom: float = HEADROOM,
               context: str = "") -> None:
    """Raises MemoryBudgetError, with re-estimated fixes, if the estimate exceeds the budget."""
    _check_positive(capacity_bytes=capacity_bytes)
    if not 0.0 < headroom <= 1.0:
        raise ValueError(f"headroom={headroom!r} must lie in (0, 1]: the usable share of memory.")
    budget = capacity_bytes * headroom
    if estimate.total <= budget:
        return
    prefix = f"{context}: " if context else ""
    lines = [f"{prefix}training needs ~{estimate.total / GIB:.2f} GiB per device, over the "
             f"{budget / GIB:.2f} GiB usable ({headroom:.0%} of {capacity_bytes / GIB:.2f} GiB).",
             estimate.describe(),
             "What to change (each alone, re-estimated):"]
    changes = [change for remedy in _REMEDIES if (change := remedy(estimate.inputs, budget))]
    smaller = _smaller_size(estimate.inputs, budget)
    lines += [f"  - {change.what}: {change.flags}{_outcome(change.inputs, budget)}"
              for change in changes + ([smaller] if smaller else [])]
    if not any(_total(change.inputs) <= budget for change in changes):
        flags, combined = _combined_changes(estimate.inputs, budget)
        lines.append(f"No single change above keeps the model; together: {' '.join(flags)}"
                     f"{_outcome(combined, budget)}")
    raise MemoryBudgetError("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class _Change:
    """One config change, in words and flags, and the inputs it leads to."""

    what: str
    flags: str
    inputs: TrainMemoryInputs


def _total(inputs: TrainMemoryInputs) -> int:
    return _estimate(inputs).total


def _state_bytes(estimate: MemoryEstimate) -> int:
    return estimate.params + estimate.grads + estimate.optimizer


def _outcome(inputs: TrainMemoryInputs, budget: float) -> str:
    total = _total(inputs)
    return f" -> ~{total / GIB:.2f} GiB{'' if total <= budget else ' (still over)'}"


def _combined_changes(inputs: TrainMemoryInputs,
                      budget: float) -> tuple[list[str], TrainMemoryInputs]:
    """Applies the remedies one after another until the estimate fits."""
    flags = []
    for remedy in _REMEDIES:
        change = remedy(inputs, budget)
        if change and _total(change.inputs) < _total(inputs):
            flags.append(change.flags)
            inputs = change.inputs
        if _total(inputs) <= budget:
            break
    return flags, inputs


def _full_remat(inputs: TrainMemoryInputs, budget: float) -> _Change | None:
    if inputs.cfg.remat_policy == "full":
        return None
    return _Change("recompute activations in the backward (remat)",
                   "--config.model.remat_policy=full",
                   dataclasses.replace(inputs, cfg=inputs.cfg.replace(remat_policy="full")))


def _fused_attention(inputs: TrainMemoryInputs, budget: float) -> _Change | None:
    cfg = inputs.cfg
    if (_resolved_attention(cfg, inputs.seq_len) != "xla"
            or inputs.seq_len <= cfg.attention_block_size):
        return None
    return _Change("drop the [N, T, S] attention logits (or attention_impl=cudnn on NVIDIA GPUs)",
                   "--config.model.attention_impl=blockwise",
                   dataclasses.replace(inputs, cfg=cfg.replace(attention_impl="blockwise")))


def _fewer_segment_slots(inputs: TrainMemoryInputs, budget: float) -> _Change | None:
    """The largest power-of-two bound on documents per row below the current one that fits:
    cuDNN's backward workspace and statistics grow with the slots."""
    cfg = inputs.cfg
    if not _attention_workspace(inputs) or cfg.max_segments_per_row == 1:
        return None
    bounds = [2**i for i in range(int(math.log2(cfg.max_segments_per_row - 1)), -1, -1)]
    changed = {m: dataclasses.replace(inputs, cfg=cfg.replace(max_segments_per_row=m))
               for m in bounds}
    bound = next((m for m in bounds if _total(changed[m]) <= budget), 1)
    return _Change("pack fewer documents per row (cuDNN's backward workspace grows with "
                   "the segment slots)", f"--config.data.max_segments_per_row={bound}",
                   changed[bound])


def _more_fsdp(inputs: TrainMemoryInputs, budget: float) -> _Change | None:
    """The smallest power-of-two growth of fsdp that fits; else, if the sharded state is
    large, the one that makes it small (a tenth of the budget) to combine with other changes."""
    growths = [2**i for i in range(1, int(math.log2(_MAX_FSDP_GROWTH)) + 1)]
    grown = {g: _estimate(dataclasses.replace(inputs, fsdp=inputs.fsdp * g)) for g in growths}
    growth = next((g for g in growths if grown[g].total <= budget), None)
    if growth is None and _state_bytes(_estimate(inputs)) > budget / 10:
        growth = next((g for g in growths if _state_bytes(grown[g]) <= budget / 10), None)
    if growth is None:
        return None
    data = inputs.data // math.gcd(inputs.data, growth)  # take what it can from the data axis
    flags = f"--config.mesh.fsdp={inputs.fsdp * growth}"
    if data != inputs.data:
        flags += f" --config.mesh.data={data}"
    devices = data * inputs.fsdp * growth * inputs.sequence * inputs.tensor
    same = devices == inputs.data * inputs.fsdp * inputs.sequence * inputs.tensor
    return _Change(f"shard parameters and optimizer {growth}x further (mesh.fsdp; "
                   f"{'the same devices' if same else f'{devices} devices'})", flags,
                   dataclasses.replace(grown[growth].inputs, data=data))


def _more_microbatches(inputs: TrainMemoryInputs, budget: float) -> _Change | None:
    """The fewest extra microbatches (dividing the rows) that fit, else one row each."""
    rows = inputs.per_device_batch
    splits = [k for k in range(2, rows + 1) if rows % k == 0]
    if not splits:
        return None
    for k in splits:
        split = dataclasses.replace(inputs, per_device_batch=rows // k,
                                    microbatches=inputs.microbatches * k)
        if _total(split) <= budget:
            break
    return _Change(f"accumulate gradients over more, smaller microbatches "
                   f"({rows} -> {rows // k} rows per device)",
                   f"--config.train.microbatches={inputs.microbatches * k}", split)


def _smaller_size(inputs: TrainMemoryInputs, budget: float) -> _Change | None:
    """The largest named size that fits with everything else unchanged."""
    cfg = inputs.cfg
    numerics = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                    attention_impl=cfg.attention_impl,
                    attention_block_size=cfg.attention_block_size, remat_policy=cfg.remat_policy,
                    max_segments_per_row=cfg.max_segments_per_row)
    smaller = [model_config_for(name, **numerics) for name in SIZE_NAMES]
    smaller = [c for c in smaller if param_count(c) < param_count(cfg)]
    for candidate in sorted(smaller, key=param_count, reverse=True):
        resized = dataclasses.replace(  # a frozen reference shrinks with the model
            inputs, cfg=candidate,
            frozen_bytes=inputs.frozen_bytes * param_count(candidate) // param_count(cfg))
        if _total(resized) <= budget:
            return _Change(f"a smaller model ({param_count(candidate) / 1e9:.2f}B parameters)",
                           f"--config.model.size={candidate.name}", resized)
    return None


# Changes that keep the model, in the order they are combined; each maps
# (inputs, budget) to a _Change, or None where it does not apply.
_REMEDIES = (_full_remat, _fused_attention, _more_fsdp, _more_microbatches, _fewer_segment_slots)
