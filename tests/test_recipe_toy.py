"""benchmarks/recipe_toy.py's own arithmetic: the Wilson intervals its claims rest on (against
published values), where it says a pivot lies, and how it reads a run's logged scalars."""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
    """The script as a module (it defines absl flags, so it is loaded once)."""
    if "recipe_toy" not in sys.modules:
        spec = importlib.util.spec_from_file_location("recipe_toy",
                                                      ROOT / "benchmarks" / "recipe_toy.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["recipe_toy"]


@pytest.mark.parametrize("p, n, expected", [
    (0.5, 100, (0.4038, 0.5962)),  # as scipy.stats.binomtest(k, n).proportion_ci(
    (0.0, 10, (0.0, 0.2775)),      #    method='wilson') gives them (scipy 1.17)
    (64 / 256, 256, (0.2009, 0.3065)),
    (90 / 256, 256, (0.2957, 0.4119)),
])
def test_wilson_interval_matches_published_values(recipe, p, n, expected):
    assert recipe.wilson(p, n) == pytest.approx(expected, abs=1e-4)


def test_pivot_place_reads_the_line_it_sits_on(recipe):
    steps = "<think>\n3+5+0=8, write 8 carry 0\n"
    assert recipe.pivot_place(steps) == "columns"
    assert recipe.pivot_place("<think>\n") == "columns"
    assert recipe.pivot_place(steps + "So 13") == "sum"
    assert recipe.pivot_place(steps + "So 13+15=28.\n</think>\nFinal answer: ") == "answer"


def test_history_reads_the_logged_scalars_in_order(recipe, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "process_0.log").write_text(
        "I2026-12-03 14:23:05,317 7580 root metrics.py:121] step 20: loss=1.5e-05 reward=-0.22\n"
        "I2026-12-03 14:23:05,400 7580 root checkpoint.py:206] Checkpoint saved: step 20\n"
        "I2026-12-03 14:23:09,417 7580 root metrics.py:121] step 20: accuracy=0.2656\n"
        "I2026-12-03 14:26:11,169 7580 root metrics.py:121] step 60: accuracy=0.2812\n")
    assert recipe.history(tmp_path) == [(20, {"loss": 1.5e-05, "reward": -0.22}),
                                        (20, {"accuracy": 0.2656}), (60, {"accuracy": 0.2812})]
    assert recipe.final_eval(tmp_path) == {"accuracy": 0.2812}


def test_printed_commands_split_back_into_the_same_words(recipe):
    overrides = {"data.mix": {"chat": 1.0}, "reasoning.system": recipe.SYSTEM,
                 "train.steps": 5, "odd": 'a$b"c'}
    words = shlex.split(recipe.command("configs/sft.py:toy", Path("/tmp/w"), overrides))
    assert words[5:] == ["--config.data.mix={'chat': 1.0}",
                         f"--config.reasoning.system={recipe.SYSTEM}", "--config.train.steps=5",
                         '--config.odd=a$b"c']
