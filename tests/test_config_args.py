"""The one `get_config(arg)` grammar of every configs/*.py: parts, groups, one-line errors."""

import re
from pathlib import Path

import pytest

from phi4_jax import config_args, config_base, stages
from phi4_jax.data import tokenizer
from phi4_jax.errors import Phi4Error

CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
GROUPS = {"size": ("tiny", "toy"), "round": ("pts", "judge")}


@pytest.mark.parametrize("arg, expected", [
    (None, {"size": None, "round": None}),
    ("", {"size": None, "round": None}),
    ("toy", {"size": "toy", "round": None}),
    ("pts", {"size": None, "round": "pts"}),
    ("toy,pts", {"size": "toy", "round": "pts"}),
    ("judge, tiny", {"size": "tiny", "round": "judge"}),
])
def test_parts_land_in_their_groups_in_any_order(arg, expected):
    assert config_args.parse_arg(arg, "configs/x.py", GROUPS) == expected


@pytest.mark.parametrize("arg, message", [
    ("tiny,toy", "configs/x.py:tiny,toy names two size choices (tiny, toy); keep one."),
    ("pts,pts", "configs/x.py:pts,pts names two round choices (pts, pts); keep one."),
    ("toy,ptss", "configs/x.py:toy,ptss: unknown part 'ptss'; choose from size (tiny, toy); "
                 "round (pts, judge), comma-separated (no argument: the paper's recipe)."),
    ("toy,", "configs/x.py:toy, has an empty part; separate choices by single commas "
             "(size (tiny, toy); round (pts, judge))."),
])
def test_bad_arguments_are_one_line_errors_listing_the_choices(arg, message):
    with pytest.raises(config_args.ConfigArgError) as error:
        config_args.parse_arg(arg, "configs/x.py", GROUPS)
    assert str(error.value) == message and isinstance(error.value, Phi4Error)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_refuses_an_unknown_part_and_two_sizes(config):
    for arg, pattern in (("nano", r"unknown part 'nano'; choose from size \(tiny, toy, "),
                         ("tiny,toy", r"names two size choices \(tiny, toy\)")):
        with pytest.raises(config_args.ConfigArgError, match=rf"^configs/{re.escape(config)}:"
                                                             rf"{arg}:? {pattern}"):
            config_base.load_config(f"configs/{config}", arg)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("size", config_args.RESEARCH_SIZES)
def test_every_config_takes_every_research_size(config, size):
    c = config_base.load_config(f"configs/{config}", size)
    assert c.model.size == {"14b-4l": "phi4-14b-4l"}.get(size, size)


def _flat(tree, prefix=""):
    return {k: v for key, value in tree.items()
            for k, v in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                         else {f"{prefix}{key}": value}).items()}


TEXT_LENGTHS = {"sft.py": ("train.seq_len", "eval.max_new_tokens"),
                "reasoning_sft.py": ("train.seq_len", "eval.max_new_tokens"),
                "dpo.py": ("train.seq_len", "eval.max_new_tokens"),
                "grpo.py": ("train.seq_len", "eval.max_new_tokens", "grpo.max_new_tokens"),
                "pts_search.py": ("pts.max_new_tokens",)}


@pytest.mark.parametrize("config", CONFIGS)
def test_toy_is_tiny_on_the_toy_model_with_room_for_byte_tokens(config):
    tiny, toy = (_flat(config_base.load_config(f"configs/{config}", size).to_dict())
                 for size in ("tiny", "toy"))
    scaled = TEXT_LENGTHS.get(config, ())
    assert {k for k in tiny if tiny[k] != toy[k]} == {"model.size", *scaled}
    assert (tiny["model.size"], toy["model.size"]) == ("tiny", "toy")
    assert [toy[k] for k in scaled] == [4 * tiny[k] for k in scaled]


@pytest.mark.parametrize("arg, keys", [
    ("toy,pts", {"pair_format": "pivotal_token", "variant": "sigmoid"}),
    ("ipo,toy", {"variant": "ipo", "length_normalize": True}),
    ("judge,robust", {"judge_weighting": "margin", "variant": "robust", "label_smoothing": 0.1}),
])
def test_dpo_variants_combine_with_a_size(arg, keys):
    c = config_base.load_config("configs/dpo.py", arg)
    assert {key: c.dpo[key] for key in keys} == keys
    assert c.model.size == ("toy" if "toy" in arg else "phi4-14b")


def test_dpo_refuses_two_losses():
    with pytest.raises(config_args.ConfigArgError, match=r"two loss choices \(ipo, hinge\)"):
        config_base.load_config("configs/dpo.py", "tiny,ipo,hinge")


# Phi-4-mini's released geometry as /work/shared/PHI4_RECIPE.md tabulates it (lines 12-19, 22):
# layers, hidden, intermediate, query/KV heads, head dim, vocab, max positions and the
# original context, rope base, rotary fraction, tied embeddings.
MINI_RELEASE = (32, 3072, 8192, 24, 8, 128, 200064, 131072, 4096, 10000.0, 0.75, True)
MINI_CONFIGS = ("sft.py", "dpo.py", "grpo.py")


def _geometry(m):
    return (m.num_layers, m.d_model, m.ffn_dim, m.num_heads, m.num_kv_heads, m.head_dim,
            m.vocab_size, m.max_positions, m.long_rope.original_max_positions, m.rope_theta,
            m.rotary_fraction, m.tie_embeddings)


@pytest.mark.parametrize("config", MINI_CONFIGS)
@pytest.mark.parametrize("arg", ["mini", "mini-tiny", "mini,lora", "lora,mini-tiny"])
def test_mini_parts_validate_and_pick_the_mini_model_and_tokenizer(config, arg):
    c = config_base.load_config(f"configs/{config}", arg)
    c.init_from = "/runs/start"
    model_cfg = config_base.validate_config(c)
    stages.check_sections(c, model_cfg)
    size = arg.replace("lora", "").strip(",")
    assert c.model.size == {"mini": "phi4-mini"}.get(size, size)
    assert tokenizer.tokenizer_for_vocab(model_cfg.vocab_size) == "phi4-mini"
    assert (c.lora.rank > 0) == ("lora" in arg)
    if size == "mini":
        assert _geometry(model_cfg) == MINI_RELEASE


@pytest.mark.parametrize("config", MINI_CONFIGS)
def test_mini_is_the_stage_recipe_on_the_mini_model(config):
    paper, mini = (_flat(config_base.load_config(f"configs/{config}", arg).to_dict())
                   for arg in (None, "mini"))
    assert {k for k in paper if paper[k] != mini[k]} <= {"model.size", "model.rope_theta",
                                                         "model.max_positions"}
    if config == "sft.py":  # PHI4_RECIPE.md line 63: "SFT: lr 1e-6, ~8B tokens"
        assert mini["train.lr"] == 1e-6
        tokens = mini["train.steps"] * mini["train.global_batch"] * mini["train.seq_len"]
        assert abs(tokens - 8e9) / 8e9 < 1e-3


@pytest.mark.parametrize("config", MINI_CONFIGS)
def test_mini_tiny_is_a_shorter_tiny_on_the_mini_model(config):
    tiny, mini = (_flat(config_base.load_config(f"configs/{config}", arg).to_dict())
                  for arg in ("tiny", "mini-tiny"))
    changed = {k for k in tiny if tiny[k] != mini[k]}
    assert changed <= {"model.size", "train.steps", "train.warmup_steps", "train.global_batch",
                       "train.loss_chunk_tokens", "eval.every_steps", "eval.batches",
                       "eval.accuracy_problems", "checkpoint.every_steps"}
    assert mini["train.seq_len"] == tiny["train.seq_len"]
    assert mini["train.steps"] * mini["train.global_batch"] < tiny["train.steps"] * tiny[
        "train.global_batch"]


def test_an_unknown_part_lists_the_mini_sizes_and_lora():
    with pytest.raises(config_args.ConfigArgError,
                       match=r"unknown part 'mni'; choose from size \(.*, mini, mini-tiny\); "
                             r"adapters \(lora\)"):
        config_base.load_config("configs/sft.py", "mni")
