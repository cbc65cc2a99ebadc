"""The one `get_config(arg)` grammar of every configs/*.py: parts, groups, one-line errors."""

import re
from pathlib import Path

import pytest

from phi4_jax import config_args, config_base
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
                 "round (pts, judge), comma-separated."),
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


@pytest.mark.parametrize("config", CONFIGS)
def test_toy_is_tiny_on_the_toy_model(config):
    tiny, toy = (config_base.load_config(f"configs/{config}", size) for size in ("tiny", "toy"))
    assert toy.model.size == "toy"
    toy.model.size = "tiny"
    assert toy.to_dict() == tiny.to_dict()


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
