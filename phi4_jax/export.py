r"""Writes a training run's checkpoint as a Hugging Face model directory:

    python -m phi4_jax.export --workdir=DIR [--step=N] [--adapter=NAME] --out=HF_DIR

The newest intact step by default. Everything comes from what the checkpoint records
(`train.loop.checkpoint_meta`): the model config that wrote it and, for a LoRA run, whose
checkpoints hold adapters only, the backbone it started from (`init_from`), read back through
`train.initial_params` as the run read it. `--adapter` folds one named adapter into the
weights (`model.lora.merged`); a LoRA run needs one. The directory gets config.json,
safetensors shards (`interop.hf_checkpoint`), generation_config.json and the tokenizer
(`interop.hf_tokenizer`), in the run's parameter dtype unless `--dtype` says otherwise.

Every check (the workdir, the step, the adapter, the backbone, `--out`) runs on metadata
before anything is loaded; a mistake is one line, `error: ...`, exit status 1. `--out` must
be new or empty: an export never overwrites.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import jax
from absl import flags
from flax import nnx

from phi4_jax.data.tokenizer import Phi4Tokenizer, load_tokenizer, tokenizer_for_vocab
from phi4_jax.errors import Phi4Error
from phi4_jax.interop import hf_checkpoint as hf
from phi4_jax.model import config as model_config, lora
from phi4_jax.model.config import ModelConfig
from phi4_jax.model.transformer import init_model
from phi4_jax.parallel import sharding
from phi4_jax.train import checkpoint, initial_params, state

# Flags of their own, not absl's global set: a process that imports this module beside another
# entry point (tests do) would otherwise define `--workdir` twice.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's --workdir.",
                               flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the "
                             "newest).", flag_values=FLAGS)
_ADAPTER = flags.DEFINE_string("adapter", None, "The LoRA adapter to merge into the weights "
                               "(a name from the run's lora.adapters).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "A new or empty folder for the Hugging Face model.",
                           flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16", "float16"],
                           "Dtype of the saved weights ('' = the run's model.param_dtype).",
                           flag_values=FLAGS)
GENERATION_CONFIG = "generation_config.json"


class ExportError(Phi4Error, ValueError):
    """An export that cannot run as asked; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """A checked export: the step folder, the model that wrote it, the adapter to merge, the
    LoRA backbone's checkpoint (None without LoRA) and the output folder."""

    step_dir: Path
    model_cfg: ModelConfig
    adapter: str | None
    backbone: initial_params.InitialCheckpoint | None
    out: Path


def plan(workdir: str, out: str, step: int | None = None, adapter: str | None = None
         ) -> ExportPlan:
    """Every check of the export, on metadata only; ExportError (or ConfigError for a
    damaged backbone) names the first problem."""
    if importlib.util.find_spec("tokenizers") is None:
        raise ExportError("export writes the tokenizer with the `tokenizers` library, which is "
                          "not installed; pip install -e \".[hf]\".")
    step_dir = _step_dir(Path(workdir).expanduser(), step)
    meta = _saved_meta(step_dir)
    model_cfg = _model_config(meta, step_dir)
    _check_adapter(model_cfg, adapter, step_dir)
    backbone = _backbone(meta, model_cfg, step_dir)
    return ExportPlan(step_dir, model_cfg, adapter, backbone, _checked_out(Path(out)))


def _step_dir(workdir: Path, step: int | None) -> Path:
    """The checkpoint folder of `step` (the newest intact one when None), checksums verified."""
    folder = workdir / "checkpoints"
    steps = checkpoint.intact_steps(folder)
    if not steps:
        raise ExportError(f"--workdir={workdir} holds no checkpoint (no intact step folder in "
                          f"{folder}); give the workdir of a run that saved one.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        problem = checkpoint.damage(folder / str(step)) if (folder / str(step)).is_dir() else None
        found = f"is damaged ({problem})" if problem else "does not exist"
        raise ExportError(f"--step={step}: that checkpoint {found} in {folder}; the intact steps "
                          f"are {', '.join(map(str, steps))}.")
    if problem := checkpoint.damage(folder / str(step), verify=True):
        raise ExportError(f"--step={step}: the checkpoint in {folder} is damaged ({problem}); "
                          f"export another step ({', '.join(map(str, steps))}).")
    return folder / str(step)


def _saved_meta(step_dir: Path) -> dict:
    """The step's run metadata, which must record the model (saved by this phi4_jax or later)."""

    meta = checkpoint.saved_meta(step_dir)
    if "model" not in meta:
        raise ExportError(
            f"the checkpoint {step_dir} records no model config (saved before checkpoints "
            f"recorded one); export it from Python with interop.hf_checkpoint."
            f"save_hf_checkpoint, giving the config it was trained with.")
    return meta


def _model_config(meta: dict, step_dir: Path) -> ModelConfig:
    """The recorded model config, set to run anywhere (plain attention, no remat)."""
    try:
        cfg = model_config.from_record(meta["model"])
    except (TypeError, ValueError) as error:
        raise ExportError(f"the model config recorded in {step_dir}/meta/metadata cannot be "
                          f"read ({error}); export another step.") from error
    return cfg.replace(attention_impl="xla", remat_policy="none")


def _check_adapter(cfg: ModelConfig, adapter: str | None, step_dir: Path) -> None:
    """An adapter is needed exactly when the run trained adapters, and must be one of them."""
    if cfg.lora is None:
        if adapter is not None:
            raise ExportError(f"--adapter={adapter}: the run of {step_dir} trained the whole "
                              f"model, no adapters; leave --adapter out.")
        return
    names = ", ".join(cfg.lora.adapters)
    if adapter is None:
        raise ExportError(f"--adapter is needed: the run of {step_dir} trained LoRA adapters "
                          f"({names}) and its checkpoints hold only them; pass --adapter=NAME "
                          f"to merge one into the backbone.")
    if adapter not in cfg.lora.adapters:
        raise ExportError(f"--adapter={adapter}: the run of {step_dir} has no such adapter; "
                          f"choose one of {names}.")


def _backbone(meta: dict, cfg: ModelConfig, step_dir: Path
              ) -> initial_params.InitialCheckpoint | None:
    """A LoRA run's backbone checkpoint (its recorded init_from), checked as the run checked
    it; None without LoRA, where the step holds the whole model."""
    if cfg.lora is None:
        return None

    source = meta.get("init_from")
    if source is None:
        raise ExportError(f"the LoRA run of {step_dir} started from a freshly initialized "
                          f"backbone (empty init_from), which no checkpoint holds; export runs "
                          f"whose lora backbone came from --config.init_from.")
    located = initial_params.InitialCheckpoint(source["kind"], Path(source["path"]))
    if not located.path.is_dir():
        raise ExportError(f"the backbone of the LoRA run of {step_dir}, {located.path}, is "
                          f"gone; restore it there to export this adapter.")
    initial_params.check(located, _abstract_params(cfg)[1], cfg)
    return located


def _checked_out(out: Path) -> Path:
    """`--out`, refused when it is a file or a folder that holds anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = (", ".join(sorted(p.name for p in out.iterdir())[:3]) if out.is_dir()
                else out.name)
        raise ExportError(f"--out={out} already holds files ({held}); give a new or empty "
                          f"folder (an export never overwrites).")
    return out


def _abstract_params(cfg: ModelConfig) -> tuple[Any, Any]:
    """(adapters, backbone) shapes, dtypes and shardings on one host CPU device: an export
    needs no accelerator and places the whole model in host memory."""
    mesh = sharding.make_mesh({axis: 1 for axis in sharding.MESH_AXES}, jax.devices("cpu")[:1])
    abstract = nnx.state(nnx.eval_shape(lambda: init_model(cfg)))
    return lora.split(state.abstract_params_on_mesh(cfg, abstract, mesh, ()))


def exported_params(export: ExportPlan) -> dict:
    """The model's parameters as the Hugging Face checkpoint holds them: the step's, or the
    backbone with the chosen adapter folded in."""
    cfg = export.model_cfg
    adapters, backbone = _abstract_params(cfg)
    step = initial_params.InitialCheckpoint("phi4", export.step_dir)
    if cfg.lora is None:
        return initial_params.load(step, backbone, cfg)
    params = lora.join(initial_params.load(step, adapters, cfg),
                       initial_params.load(export.backbone, backbone, cfg))
    return lora.merged(params, cfg.lora, export.adapter)


def generation_config(tokenizer: Phi4Tokenizer) -> dict:
    """transformers' GenerationConfig: generation stops at the end of a turn or a document,
    as phi4_jax's samplers stop."""
    stops = list(dict.fromkeys([tokenizer.end_of_turn_id, tokenizer.eot_id]))
    return {"bos_token_id": tokenizer.eot_id, "eos_token_id": stops,
            "pad_token_id": tokenizer.pad_id}


def write(export: ExportPlan, dtype: str = "") -> Path:
    """Writes the Hugging Face directory of a checked export; returns it."""
    from phi4_jax.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top  # [hf] extra
    cfg = export.model_cfg
    tokenizer = load_tokenizer(tokenizer_for_vocab(cfg.vocab_size))
    hf.save_hf_checkpoint(nnx.State(exported_params(export)), cfg, export.out,
                          dtype=dtype or cfg.param_dtype,
                          token_ids=hf_tokenizer.token_ids(tokenizer))
    (export.out / GENERATION_CONFIG).write_text(
        json.dumps(generation_config(tokenizer), indent=2) + "\n")
    hf_tokenizer.save_hf_tokenizer(tokenizer, export.out, max_length=cfg.max_positions)
    return export.out


def main(argv: list[str]) -> int:
    try:
        FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        for name, flag in (("workdir", _WORKDIR), ("out", _OUT)):
            if not flag.value:
                raise ExportError(f"--{name} is required: python -m phi4_jax.export "
                                  f"--workdir=DIR [--step=N] [--adapter=NAME] --out=HF_DIR")
        export = plan(_WORKDIR.value, _OUT.value, _STEP.value, _ADAPTER.value)
        out = write(export, _DTYPE.value)
    except Phi4Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    adapter = f" with adapter {export.adapter!r} merged" if export.adapter else ""
    print(f"Exported {export.step_dir}{adapter} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
