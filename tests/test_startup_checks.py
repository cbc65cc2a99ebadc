"""Each config section is checked once per start: the shared keys, the data config, each
source spec (its globs resolved once), the stage's own sections."""

import collections

import pytest

from phi4_jax import config_base, stages
from phi4_jax.data import pipeline, sources
from phi4_jax.stages import dpo, pretrain, sft
from phi4_jax.train import loop


class _Started(Exception):
    """Raised where start-up ends and the state would be created."""


def _count(monkeypatch, module, name, calls, counts=lambda *a, **k: True):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] += bool(counts(*args, **kwargs))
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("spec, stage", [("pretrain.py:tiny", pretrain), ("sft.py:tiny", sft),
                                         ("dpo.py:tiny", dpo)])
def test_every_section_is_checked_once_per_start(spec, stage, tmp_path, monkeypatch):
    calls = collections.Counter()
    _count(monkeypatch, config_base, "validate_config", calls)
    _count(monkeypatch, pipeline, "checked_data_config", calls,
           counts=lambda data: not isinstance(data, pipeline.CheckedDataConfig))
    _count(monkeypatch, sources, "validate_source_spec", calls)
    _count(monkeypatch, sources, "resolve_paths", calls)
    _count(monkeypatch, stage, "check", calls)

    def started(*args):
        raise _Started
    monkeypatch.setattr(loop, "_restore_or_init", started)
    config = config_base.load_config(spec)
    config.eval.batches = 1
    globbed = 0
    if stage is pretrain:  # a source read through a glob: resolved once, at the check
        for i in range(3):
            (tmp_path / f"notes-{i}.txt").write_text(f"note {i}: " + "words " * 200)
        config.data.sources.notes = config_base.source_spec(
            "text", paths=str(tmp_path / "notes-*.txt"))
        config.data.mix = {**config.data.mix, "notes": 0.5}
        globbed = 1
    with pytest.raises(_Started):  # the data iterators and eval batches are built by then
        stages.run(config, str(tmp_path / "run"))
    assert dict(calls) == {"validate_config": 1, "checked_data_config": 1, "check": 1,
                           "validate_source_spec": len(config.data.sources),
                           **({"resolve_paths": globbed} if globbed else {})}
