"""Stage configs: the paper's numbers, overrides through the real flag parser, validation."""

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

from phi4_jax import config_base, stages
from phi4_jax.data import pipeline, synthetic
from phi4_jax.evals import verifiable
from phi4_jax.stages import evaluation

ROOT = Path(__file__).resolve().parents[1]


def _load(arg=None):
    return config_base.load_config("configs/pretrain.py", arg)


def test_default_is_the_paper_recipe():
    c = _load()
    model_cfg = config_base.validate_config(c)
    assert model_cfg.name == "phi4-14b" and model_cfg.rope_theta == 10_000.0
    assert (c.train.seq_len, c.train.global_batch, c.train.lr, c.train.weight_decay) == (
        4096, 5760, 3e-4, 0.1)
    assert abs(c.train.steps * 5760 * 4096 - 10e12) / 10e12 < 1e-4
    assert dict(c.data.mix) == {"web": 0.15, "web_rewrites": 0.15, "synthetic": 0.40,
                                "code": 0.20, "books": 0.10}


@pytest.mark.parametrize("arg", ["tiny", "125m", "1b", "14b-4l"])
def test_variants_validate(arg):
    c = _load(arg)
    config_base.validate_config(c)
    if arg == "tiny":
        pipeline.validate_data_config(c.data)  # built-in sources, offline


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        _load("7b")


@pytest.mark.parametrize("key, value, message", [
    ("train.lr", -1.0, "train.lr"),
    ("train.schedule", "step", "train.schedule"),
    ("train.microbatches", 3, "train.microbatches"),
    ("train.warmup_steps", 10_000, "train.warmup_steps"),
    ("train.seq_len", 8192, "model.max_positions"),
    ("model.size", "7b", "model.size"),
    ("data.max_segments_per_row", 0, "data.max_segments_per_row"),
    ("eval.accuracy_families", "modular,trigonometry", r"eval.accuracy_families names unknown "
                                                       r"exercise families \['trigonometry'\]"),
    ("eval.stop_at_accuracy", 1.5, r"eval.stop_at_accuracy.*\[0, 1\]"),
    ("eval.stop_at_accuracy", 0.3, r"eval.stop_at_accuracy.*set eval.accuracy_problems > 0"),
    ("eval.accuracy_offset", 2**40, r"eval.accuracy_offset.*within the eval span"),
])
def test_validation_names_key_and_fix(key, value, message):
    c = _load("tiny")
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
    with pytest.raises(config_base.ConfigError, match=message):
        config_base.validate_config(c)


@pytest.mark.parametrize("spec", ["pretrain.py", "midtrain.py:tiny", "sft.py", "sft.py:tiny",
                                  "dpo.py", "dpo.py:tiny", "reasoning_sft.py:tiny", "grpo.py",
                                  "grpo.py:tiny", "pts_search.py:tiny"])
def test_every_stage_config_passes_its_own_section_checks(spec):
    c = config_base.load_config(spec)
    c.init_from = c.init_from or "/runs/start"  # PTS samples a trained model
    stages.check_sections(c, config_base.validate_config(c))


def test_unknown_stage_names_the_stages():
    c = _load("tiny")
    c.stage = "rlhf"
    with pytest.raises(config_base.ConfigError, match="stage='rlhf'.*pretrain"):
        stages.builder_for(c)


def _print_config(*overrides):
    """Runs the real flag parser in a subprocess and prints the parsed config fields."""
    code = ("from absl import app\nfrom ml_collections import config_flags\n"
            "C = config_flags.DEFINE_config_file('config')\n"
            "def main(_):\n  c = C.value\n"
            "  print(dict(c.data.mix)); print(c.train.lr); print(c.mesh.fsdp)\n"
            "app.run(main)\n")
    out = subprocess.run([sys.executable, "-c", code, "--config=configs/pretrain.py:tiny",
                          *overrides], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.slow
def test_overrides_through_flags():
    mix, lr, fsdp = _print_config("--config.data.mix.synthetic=0.5", "--config.train.lr=1e-4",
                                  "--config.mesh.fsdp=2")
    assert ast.literal_eval(mix) == {"synthetic": 0.5, "code": 0.4}
    assert (float(lr), int(fsdp)) == (1e-4, 2)
    mix, _, _ = _print_config("--config.data.mix={'web': 0.5, 'code': 0.5}")
    assert ast.literal_eval(mix) == {"web": 0.5, "code": 0.5}


def test_mix_naming_a_source_without_spec_is_refused():
    c = _load("tiny")
    c.data.mix = {"webz": 1.0}
    with pytest.raises(ValueError, match="webz"):
        pipeline.validate_data_config(c.data)


@pytest.mark.parametrize("config_file, key, value", [
    ("configs/grpo.py", None, None),
    ("configs/sft.py", "eval.accuracy_problems", 4),
    ("configs/reasoning_sft.py", "reasoning.teachable_pool", 4),
])
def test_decoding_on_a_sequence_split_mesh_is_refused(config_file, key, value):
    config = config_base.load_config(config_file, "tiny")
    config.eval.accuracy_problems = 0
    if key:
        section, name = key.split(".")
        config[section][name] = value
    config.mesh.update(sequence=2, fsdp=1)
    with pytest.raises(config_base.ConfigError, match=r"mesh\.sequence=2.*set --config\.mesh\.sequence=1"):
        config_base.validate_config(config)
    config.mesh.sequence = 1
    config_base.validate_config(config)


def test_accuracy_is_measured_on_the_named_families(monkeypatch):
    asked = {}
    monkeypatch.setattr(verifiable, "greedy_accuracy",
                        lambda *a, **kw: asked.update(kw) or {"accuracy": 0.0})
    config = config_base.load_config("configs/reasoning_sft.py", "tiny")
    config.eval.accuracy_families = "rate, modular"
    run = types.SimpleNamespace(config=config, graphdef=None, model_cfg=None, tokenizer=None)
    evaluation.greedy_accuracy(run, None)
    assert asked["families"] == ("rate", "modular") and asked["fmt"] is not None
    config.eval.accuracy_families = ""
    evaluation.greedy_accuracy(run, None)
    assert asked["families"] == synthetic.FAMILIES
