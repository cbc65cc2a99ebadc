"""Hugging Face interop: `microsoft/phi-4` and `microsoft/Phi-4-mini-instruct`-format
safetensors checkpoints in and out.

The released checkpoints are transformers' `Phi3ForCausalLM`: torch `[out, in]` kernels, one
fused `qkv_proj` and one fused `gate_up_proj` per layer, one tensor per layer (Phi-4-mini:
no `lm_head`, tied to the embedding; LongRoPE in its config). Here the same weights are JAX
`[in, out]` kernels stacked on a leading layer axis. A single layout table (`_LAYOUT`)
describes the correspondence; import, export and the shape check all read it. Adapters
(`model.lora`) are not part of a checkpoint: fold one in with `lora.merged` before saving.

Import streams one parameter at a time (each layer's rows read straight from the memory-mapped
file into a preallocated stacked host array, which is placed on devices before the next is
read), so a 14B import holds at most one stacked parameter on the host besides the result.
Export writes one shard at a time.

    cfg = model_config_from_hf("phi-4/config.json", param_dtype="bfloat16")
    params = load_hf_checkpoint("phi-4", cfg)
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg))), params)
    save_hf_checkpoint(model, cfg, "phi-4-sft")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from phi4_jax.errors import Phi4Error
from phi4_jax.model.transformer import Transformer, init_model
from phi4_jax.model.config import ModelConfig, ModelConfigError
from phi4_jax.model.rope import LongRoPE, default_attention_factor
from phi4_jax.data.tokenizer import (PHI4_MINI_SPECIAL_TOKENS, PHI4_MINI_VOCAB_SIZE,
                                     PHI4_SPECIAL_TOKENS, PHI4_VOCAB_SIZE)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
ParamPath = tuple[str, ...]

# Checkpoint order. Each HF tensor holds one or more JAX parameters as consecutive row blocks
# (q, k, v in qkv_proj; gate, up in gate_up_proj). The number is how many leading JAX axes
# make up torch's input dimension; 0 means the tensor is stored in the same layout.
_LAYOUT: tuple[tuple[str, tuple[tuple[ParamPath, int], ...]], ...] = (
    ("model.embed_tokens.weight", ((("embed_VD",), 0),)),
    ("model.layers.{i}.input_layernorm.weight", ((("blocks", "attn_norm", "scale"), 0),)),
    ("model.layers.{i}.self_attn.qkv_proj.weight", ((("blocks", "attn", "q_DNH"), 1),
                                                    (("blocks", "attn", "k_DKH"), 1),
                                                    (("blocks", "attn", "v_DKH"), 1))),
    ("model.layers.{i}.self_attn.o_proj.weight", ((("blocks", "attn", "o_NHD"), 2),)),
    ("model.layers.{i}.post_attention_layernorm.weight", ((("blocks", "mlp_norm", "scale"), 0),)),
    ("model.layers.{i}.mlp.gate_up_proj.weight", ((("blocks", "mlp", "gate_DF"), 1),
                                                  (("blocks", "mlp", "up_DF"), 1))),
    ("model.layers.{i}.mlp.down_proj.weight", ((("blocks", "mlp", "down_FD"), 1),)),
    ("model.norm.weight", ((("final_norm", "scale"), 0),)),
    ("lm_head.weight", ((("lm_head_DV",), 1),)),
)
# Buffers some exporters write that hold no parameters (recomputed from the config).
_IGNORED_TENSOR = re.compile(r".*rotary_emb\.inv_freq$")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_SAVE_DTYPES = ("bfloat16", "float32", "float16")


class HFCheckpointError(Phi4Error, ValueError):
    """A Hugging Face checkpoint or config this model cannot take; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """The bos/eos/pad ids written into config.json (None leaves one unset)."""

    bos: int | None
    eos: int | None
    pad: int | None


# The current phi-4 release: bos <|endoftext|>, eos <|im_end|>, pad <|dummy_85|>.
PHI4_TOKEN_IDS = SpecialTokenIds(bos=PHI4_SPECIAL_TOKENS["<|endoftext|>"],
                                 eos=PHI4_SPECIAL_TOKENS["<|im_end|>"],
                                 pad=PHI4_SPECIAL_TOKENS["<|dummy_85|>"])
# microsoft/Phi-4-mini-instruct config.json: bos, eos and pad all <|endoftext|> (199999).
PHI4_MINI_TOKEN_IDS = SpecialTokenIds(bos=PHI4_MINI_SPECIAL_TOKENS["<|endoftext|>"],
                                      eos=PHI4_MINI_SPECIAL_TOKENS["<|endoftext|>"],
                                      pad=PHI4_MINI_SPECIAL_TOKENS["<|endoftext|>"])
_RELEASE_TOKEN_IDS = {PHI4_VOCAB_SIZE: PHI4_TOKEN_IDS, PHI4_MINI_VOCAB_SIZE: PHI4_MINI_TOKEN_IDS}


@dataclasses.dataclass(frozen=True)
class _Block:
    """One JAX parameter (one layer of it, if stacked) as rows [start, stop) of an HF tensor."""

    path: ParamPath
    start: int
    stop: int
    in_dims: int


@dataclasses.dataclass(frozen=True)
class _HFTensor:
    """A Hugging Face tensor: its name, torch shape, layer and the JAX blocks it holds."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    blocks: tuple[_Block, ...]


# ---------------------------------------------------------------------------------------------
# The layout: HF tensors of a config, and the conversion of one block each way.


def _abstract_params(cfg: ModelConfig) -> nnx.State:
    """The parameters a checkpoint holds (never adapters), shapes only."""
    return nnx.state(nnx.eval_shape(lambda: init_model(cfg.replace(lora=None))), nnx.Param)


def _param_shapes(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shapes of the model's parameters, from an abstract (unallocated) model."""
    return {path: tuple(var.shape) for path, var in nnx.to_flat_state(_abstract_params(cfg))}


def _torch_block_shape(layer_shape: tuple[int, ...], in_dims: int) -> tuple[int, ...]:
    """The [out, in] shape of a JAX kernel of shape [in..., out...] (unchanged if in_dims is 0)."""
    if not in_dims:
        return layer_shape
    return (math.prod(layer_shape[in_dims:]), math.prod(layer_shape[:in_dims]))


def _tensor_blocks(params: tuple[tuple[ParamPath, int], ...], layer_shapes: list[tuple[int, ...]]
                   ) -> tuple[tuple[int, ...], tuple[_Block, ...]]:
    """The torch shape of one HF tensor and the row block each of its JAX parameters fills."""
    torch_shapes = [_torch_block_shape(s, in_dims) for s, (_, in_dims) in zip(layer_shapes, params)]
    starts = np.cumsum([0] + [s[0] for s in torch_shapes]).tolist()
    blocks = tuple(_Block(path, starts[j], starts[j + 1], in_dims)
                   for j, (path, in_dims) in enumerate(params))
    return (starts[-1], *torch_shapes[0][1:]), blocks


def _hf_tensors(cfg: ModelConfig) -> list[_HFTensor]:
    """Every tensor a checkpoint of this config holds, layer by layer as checkpoints store them."""
    shapes = _param_shapes(cfg)
    ordered = []
    after_layers = False
    for j, (name, params) in enumerate(_LAYOUT):
        if any(path not in shapes for path, _ in params):
            continue  # lm_head.weight of a tied model
        stacked = "{i}" in name
        after_layers |= stacked
        shape, blocks = _tensor_blocks(
            params, [shapes[path][1:] if stacked else shapes[path] for path, _ in params])
        for layer in (range(cfg.num_layers) if stacked else [None]):
            position = layer if stacked else (cfg.num_layers if after_layers else -1)
            ordered.append(((position, j), _HFTensor(name.format(i=layer), shape, layer, blocks)))
    return [tensor for _, tensor in sorted(ordered, key=lambda entry: entry[0])]


def _to_jax(torch_block: np.ndarray, layer_shape: tuple[int, ...], in_dims: int) -> np.ndarray:
    """[out, in] rows of a torch weight -> the JAX [in..., out...] kernel."""
    return torch_block.T.reshape(layer_shape) if in_dims else torch_block.reshape(layer_shape)


def _to_torch(jax_value: np.ndarray, in_dims: int) -> np.ndarray:
    """A JAX [in..., out...] kernel -> torch [out, in] rows."""
    if not in_dims:
        return jax_value
    return jax_value.reshape(math.prod(jax_value.shape[:in_dims]), -1).T


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint's headers against a config, before any tensor data is read.


def _describe(cfg: ModelConfig) -> str:
    """The config's name and the fields that decide tensor names and shapes."""
    return (f"model config {cfg.name!r} (num_layers={cfg.num_layers}, d_model={cfg.d_model}, "
            f"num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, ffn_dim={cfg.ffn_dim}, "
            f"vocab_size={cfg.vocab_size}, tie_embeddings={cfg.tie_embeddings})")


def _list_names(names: list[str], limit: int = 6) -> str:
    """The first few names, and how many more, so an error stays readable for 14B."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _checkpoint_geometry(found: Mapping[str, tuple[int, ...]]) -> str:
    """What the checkpoint looks like, read from its tensor names and the embedding's shape."""
    layers = {int(m.group(1)) for name in found if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    parts = [f"{max(layers) + 1} layers" if layers else "no layers"]
    if "model.embed_tokens.weight" in found:
        vocab, hidden = found["model.embed_tokens.weight"]
        parts.append(f"hidden size {hidden}, vocab {vocab}")
    parts.append("an lm_head" if "lm_head.weight" in found else "no lm_head (tied embeddings)")
    return ", ".join(parts)


def check_checkpoint_matches(found: Mapping[str, tuple[int, ...]], cfg: ModelConfig,
                             source: str = "checkpoint") -> None:
    """Raises naming the first tensor, in checkpoint order, that is missing, extra or misshapen."""
    expected = {t.name: t.shape for t in _hf_tensors(cfg)}
    found = {name: tuple(shape) for name, shape in found.items() if not _IGNORED_TENSOR.match(name)}
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    misshapen = [name for name in expected if name in found and found[name] != expected[name]]
    if not (missing or unexpected or misshapen):
        return
    first = next((name for name in expected if name in missing or name in misshapen), None)
    if first is None:
        first_problem = f"unexpected tensor {unexpected[0]} {list(found[unexpected[0]])}"
    elif first in missing:
        first_problem = f"missing tensor {first} (expected shape {list(expected[first])})"
    else:
        first_problem = (f"tensor {first} has shape {list(found[first])}, "
                         f"expected {list(expected[first])}")
    problems = (("missing", missing), ("unexpected", unexpected),
                ("with the wrong shape", misshapen))
    counts = [f"{len(names)} {kind}: {_list_names(names)}" for kind, names in problems if names]
    raise HFCheckpointError(
        f"{source} does not match {_describe(cfg)}: {first_problem}. {'; '.join(counts)}. "
        f"The checkpoint has {_checkpoint_geometry(found)}. Choose the size that matches, or "
        f"build the config from the checkpoint's config.json with model_config_from_hf.")


# ---------------------------------------------------------------------------------------------
# Import.


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded via its index, or single)."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".index.json"):
        path, index = path.parent, path
    elif path.is_file():
        return [path]
    else:
        index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise HFCheckpointError(f"{index} lists shard files that do not exist: "
                                    f"{_list_names(absent)}; copy the whole checkpoint directory.")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise HFCheckpointError(f"no checkpoint at {path}: expected {INDEX_FILE} or {SINGLE_FILE} "
                            f"there (a Hugging Face model directory), or a .safetensors file.")


def _tensor_sources(files: list[Path], stack: contextlib.ExitStack) -> dict[str, Any]:
    """Tensor name -> open safetensors file, after checking every tensor is a float tensor."""
    sources = {}
    for file in files:
        handle = stack.enter_context(safe_open(str(file), framework="numpy"))
        for name in handle.keys():
            dtype = handle.get_slice(name).get_dtype()
            if dtype not in _FLOAT_DTYPES and not _IGNORED_TENSOR.match(name):
                raise HFCheckpointError(
                    f"tensor {name} in {file} has dtype {dtype}; only unquantized float "
                    f"checkpoints ({', '.join(_FLOAT_DTYPES)}) can be imported.")
            sources[name] = handle
    return sources


def _read_parameter(shape: tuple[int, ...], dtype: np.dtype, parts: list[tuple[_HFTensor, _Block]],
                    sources: Mapping[str, Any]) -> np.ndarray:
    """Fills one (stacked) parameter from its row blocks, one layer at a time."""
    host = np.empty(shape, dtype)
    for tensor, block in parts:
        rows = sources[tensor.name].get_slice(tensor.name)[block.start:block.stop]
        target = (tensor.layer,) if tensor.layer is not None else ()
        host[target] = _to_jax(rows, host[target].shape, block.in_dims)
    return host


def _checked_sources(path: str | Path, cfg: ModelConfig, stack: contextlib.ExitStack
                     ) -> dict[str, Any]:
    """The open tensor sources of a checkpoint, after checking every shape against `cfg`."""
    sources = _tensor_sources(checkpoint_files(path), stack)
    found = {name: tuple(src.get_slice(name).get_shape()) for name, src in sources.items()}
    check_checkpoint_matches(found, cfg, source=f"checkpoint {path}")
    return sources


def check_hf_checkpoint(path: str | Path, cfg: ModelConfig) -> None:
    """Raises HFCheckpointError unless the checkpoint's tensors fit `cfg`; reads headers only."""
    with contextlib.ExitStack() as stack:
        _checked_sources(path, cfg, stack)


def load_hf_checkpoint(path: str | Path, cfg: ModelConfig, *, dtype: str | None = None,
                       shardings: nnx.State | None = None) -> nnx.State:
    """The parameter state (`nnx.state(model, nnx.Param)`) of a phi-4-format checkpoint.

    `dtype` defaults to `cfg.param_dtype`; `shardings` (e.g. `sharding.state_shardings`) places
    each parameter as it is read. Merge into a model with `nnx.merge(graphdef, state)`.
    """
    dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    abstract = _abstract_params(cfg)
    placements = _placements(abstract, shardings)
    parts: dict[ParamPath, list[tuple[_HFTensor, _Block]]] = {}
    for tensor in _hf_tensors(cfg):
        for block in tensor.blocks:
            parts.setdefault(block.path, []).append((tensor, block))
    with contextlib.ExitStack() as stack:
        sources = _checked_sources(path, cfg, stack)
        leaves = []
        for param_path, var in nnx.to_flat_state(abstract):
            host = _read_parameter(var.shape, dtype, parts[param_path], sources)
            placed = jax.device_put(host, placements.get(param_path))
            del host  # the next parameter's host copy is allocated only after this one is freed
            leaves.append((param_path, var.replace(value=placed)))
    return nnx.from_flat_state(leaves)


def _placements(abstract: nnx.State, shardings: nnx.State | None) -> dict[ParamPath, Any]:
    """Parameter path -> sharding, checked to cover exactly the model's parameters."""
    if shardings is None:
        return {}
    placements = {path: var.get_value() if isinstance(var, nnx.Variable) else var
                  for path, var in nnx.to_flat_state(shardings)}
    wanted = [path for path, _ in nnx.to_flat_state(abstract)]
    if set(placements) != set(wanted):
        raise HFCheckpointError(
            f"`shardings` must have one entry per model parameter ({len(wanted)}: "
            f"{wanted[:3]} ...), got paths {sorted(placements)[:3]} ...; build it with "
            f"sharding.state_shardings(nnx.state(abstract_model, nnx.Param), mesh, rules).")
    return placements


# ---------------------------------------------------------------------------------------------
# Export.


def _host_params(params: nnx.State | nnx.Module, cfg: ModelConfig) -> dict[ParamPath, Any]:
    """Parameter path -> array, checked against the config's shapes."""
    state = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
    values = {path: var.get_value() if isinstance(var, nnx.Variable) else var
              for path, var in nnx.to_flat_state(state)}
    if any("adapters" in path for path in values):
        raise HFCheckpointError(
            "the parameters hold adapters, which a Hugging Face checkpoint has no place for; "
            "fold one into the weights first: model.lora.merged(params, cfg.lora, name).")
    expected = _param_shapes(cfg)
    for path, shape in expected.items():
        if path not in values or tuple(values[path].shape) != shape:
            found = tuple(values[path].shape) if path in values else "absent"
            raise HFCheckpointError(
                f"parameter {'/'.join(path)} is {found}, expected {shape} for {_describe(cfg)}; "
                f"pass the config the model was built with.")
        if isinstance(values[path], jax.Array) and not values[path].is_fully_addressable:
            raise HFCheckpointError(
                f"parameter {'/'.join(path)} spans several processes; gather the parameters "
                f"(jax.experimental.multihost_utils.process_allgather) before saving.")
    return values


def _torch_tensor(tensor: _HFTensor, values: Mapping[ParamPath, Any],
                  dtype: np.dtype) -> np.ndarray:
    """One HF tensor in torch layout, built from its JAX blocks on the host."""
    rows = []
    for block in tensor.blocks:
        value = values[block.path] if tensor.layer is None else values[block.path][tensor.layer]
        rows.append(_to_torch(np.asarray(jax.device_get(value)).astype(dtype), block.in_dims))
    return np.ascontiguousarray(np.concatenate(rows) if len(rows) > 1 else rows[0])


def _plan_shards(tensors: list[_HFTensor], itemsize: int,
                 max_shard_bytes: float) -> list[list[_HFTensor]]:
    """Consecutive tensors in shards of at most max_shard_bytes (a lone tensor may exceed it)."""
    shards: list[list[_HFTensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _release_token_ids(cfg: ModelConfig) -> SpecialTokenIds:
    """The released bos/eos/pad of the vocabulary's family (phi-4 or Phi-4-mini)."""
    if cfg.vocab_size not in _RELEASE_TOKEN_IDS:
        raise HFCheckpointError(
            f"no released special-token ids for vocab_size={cfg.vocab_size} (phi-4 has "
            f"{PHI4_VOCAB_SIZE}, Phi-4-mini {PHI4_MINI_VOCAB_SIZE}); pass "
            f"token_ids=SpecialTokenIds(bos=..., eos=..., pad=...).")
    return _RELEASE_TOKEN_IDS[cfg.vocab_size]


def _rope_config(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None, int, int]:
    """(rope_parameters, rope_scaling, max and original max positions) for config.json; the
    LongRoPE scaling as the release writes it, which transformers before 5.0 also reads."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta),
            "partial_rotary_factor": float(cfg.rotary_fraction)}
    long_rope = cfg.long_rope
    if long_rope is None:
        return rope, None, cfg.max_positions, cfg.max_positions
    factors = {"short_factor": list(long_rope.short_factor),
               "long_factor": list(long_rope.long_factor)}
    if long_rope.attention_factor is not None:
        factors["attention_factor"] = long_rope.attention_factor
    rope = {**rope, "rope_type": "longrope", **factors,
            "original_max_position_embeddings": long_rope.original_max_positions}
    return (rope, {"type": "longrope", **factors}, long_rope.max_positions,
            long_rope.original_max_positions)


def hf_config_dict(cfg: ModelConfig, token_ids: SpecialTokenIds | None = None,
                   dtype: str = "bfloat16") -> dict[str, Any]:
    """transformers' `Phi3Config` fields for this geometry (current and pre-5.0 rope keys);
    `token_ids` default to the release's for the vocabulary (phi-4 or Phi-4-mini)."""
    token_ids = token_ids or _release_token_ids(cfg)
    for role, token_id in dataclasses.asdict(token_ids).items():
        if token_id is not None and not 0 <= token_id < cfg.vocab_size:
            raise HFCheckpointError(
                f"{role}_token_id={token_id} is outside the vocabulary of {_describe(cfg)}; pass "
                f"token_ids=SpecialTokenIds(...) with ids below {cfg.vocab_size} (or None).")
    rope, rope_scaling, max_positions, original_max_positions = _rope_config(cfg)
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu", "attention_bias": False, "sliding_window": None,
        "max_position_embeddings": max_positions,
        "original_max_position_embeddings": original_max_positions,
        "rope_parameters": rope, "rope_theta": rope["rope_theta"], "rope_scaling": rope_scaling,
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "attention_dropout": 0.0, "embd_pdrop": 0.0,
        "resid_pdrop": 0.0, "use_cache": True, "dtype": dtype,
        "bos_token_id": token_ids.bos, "eos_token_id": token_ids.eos, "pad_token_id": token_ids.pad,
    }


def save_hf_checkpoint(params: nnx.State | Transformer, cfg: ModelConfig, path: str | Path, *,
                       max_shard_bytes: float = 5e9, dtype: str = "bfloat16",
                       token_ids: SpecialTokenIds | None = None) -> Path:
    """Writes a Phi3ForCausalLM checkpoint: safetensors (sharded past max_shard_bytes), config.json.

    `params` is a model or its `nnx.Param` state (adapters folded in, `lora.merged`); the
    directory must not hold a checkpoint yet. `token_ids` default to the release's.
    """
    if dtype not in _SAVE_DTYPES:
        raise HFCheckpointError(f"dtype={dtype!r}: choose one of {_SAVE_DTYPES}.")
    config = hf_config_dict(cfg, token_ids, dtype)
    values = _host_params(params, cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    existing = sorted(path.glob("model*.safetensors*"))
    if existing:
        raise HFCheckpointError(f"{path} already holds a checkpoint ({existing[0].name}); save to "
                                f"a new directory or remove the old files first.")
    np_dtype = np.dtype(jnp.dtype(dtype))
    shards = _plan_shards(_hf_tensors(cfg), np_dtype.itemsize, max_shard_bytes)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = (SINGLE_FILE if len(shards) == 1
                else f"model-{k:05d}-of-{len(shards):05d}.safetensors")
        save_file({t.name: _torch_tensor(t, values, np_dtype) for t in shard}, str(path / file),
                  metadata={"format": "pt"})
        weight_map.update({t.name: file for t in shard})
    if len(shards) > 1:
        total = sum(math.prod(t.shape) * np_dtype.itemsize for shard in shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig.


def _read_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """config.json as a dict, given the dict, the file or its directory."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    path = path / CONFIG_FILE if path.is_dir() else path
    if not path.is_file():
        raise HFCheckpointError(f"no Hugging Face config at {path}; pass config.json or its "
                                f"directory.")
    return json.loads(path.read_text())


def _require(config: Mapping[str, Any], key: str) -> Any:
    """A key Phi3Config has no sensible default for (the geometry)."""
    if key not in config:
        raise HFCheckpointError(f"config.json has no {key!r}; a Phi3Config needs it.")
    return config[key]


def _rope_fields(config: Mapping[str, Any]) -> tuple[float, float, LongRoPE | None]:
    """(rope base, rotary fraction, LongRoPE or None) from `rope_parameters` (transformers 5)
    or the older keys, read as transformers' Phi3Config reads them."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "longrope", "su", "yarn"):  # Phi-3 reads su, yarn as longrope
        raise HFCheckpointError(
            f"config.json asks for rope_type {rope_type!r}; this model implements plain RoPE "
            f"and Phi-3/Phi-4-mini's LongRoPE ('longrope') only.")
    theta = rope.get("rope_theta", config.get("rope_theta", 10_000.0))
    fraction = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    long_rope = None if rope_type == "default" else _long_rope(config, rope)
    return float(theta), float(fraction), long_rope


def _long_rope(config: Mapping[str, Any], rope: Mapping[str, Any]) -> LongRoPE:
    """LongRoPE from config.json: transformers takes the original length from the rope
    parameters or the top-level key (Phi3Config's default 4096 when absent) and derives the attention factor from
    `factor`, else from max / original positions."""
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = rope.get(name)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise HFCheckpointError(f"config.json rope scaling {name}={values!r}: LongRoPE needs "
                                    f"a list of numbers, one per rotary pair.")
        factors[name] = tuple(float(v) for v in values)
    max_positions = config.get("max_position_embeddings", 4096)
    original = rope.get("original_max_position_embeddings",
                        config.get("original_max_position_embeddings", 4096))
    attention_factor = rope.get("attention_factor")
    if attention_factor is None and rope.get("factor") is not None:
        attention_factor = default_attention_factor(rope["factor"] * original, original)
    return LongRoPE(**factors, original_max_positions=original, max_positions=max_positions,
                    attention_factor=None if attention_factor is None else float(attention_factor))


def _refuse_unsupported(config: Mapping[str, Any]) -> None:
    """Refuses Phi3Config features this decoder does not implement, naming the key."""
    if config.get("model_type", "phi3") != "phi3":
        raise HFCheckpointError(f"config.json model_type is {config['model_type']!r}; only 'phi3' "
                                f"(Phi3ForCausalLM, the phi-4 architecture) can be imported.")
    if config.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"config.json hidden_act is {config['hidden_act']!r}; this model "
                                f"implements SwiGLU with silu only.")
    if config.get("attention_bias", False):
        raise HFCheckpointError("config.json has attention_bias true; this model has no biases.")
    window = config.get("sliding_window")
    if window is not None and window < config.get("max_position_embeddings", 4096):
        raise HFCheckpointError(f"config.json sets sliding_window={window}; this model uses full "
                                f"attention only.")
    head_dim = config.get("head_dim")
    if head_dim is not None and (head_dim * _require(config, "num_attention_heads")
                                 != _require(config, "hidden_size")):
        raise HFCheckpointError(f"config.json head_dim={head_dim} is not hidden_size / "
                                f"num_attention_heads; this model derives head_dim that way.")


def model_config_from_hf(config: str | Path | Mapping[str, Any], **overrides) -> ModelConfig:
    """A ModelConfig named 'hf' from a Phi3Config config.json (path, directory or dict).

    Overrides set non-geometry fields (param_dtype, attention_impl, ...) or replace read ones.
    Keys a config may omit take Phi3Config's own defaults.
    """
    config = _read_config(config)
    _refuse_unsupported(config)
    rope_theta, rotary_fraction, long_rope = _rope_fields(config)
    heads = _require(config, "num_attention_heads")
    fields = dict(
        num_layers=_require(config, "num_hidden_layers"), d_model=_require(config, "hidden_size"),
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_dim=_require(config, "intermediate_size"), vocab_size=_require(config, "vocab_size"),
        max_positions=config.get("max_position_embeddings", 4096), rope_theta=rope_theta,
        rotary_fraction=rotary_fraction, norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), long_rope=long_rope)
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelConfigError(f"unknown model field(s) {unknown}; known fields: {sorted(known)}.")
    return ModelConfig(name="hf", **{**fields, **overrides})
