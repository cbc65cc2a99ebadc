r"""PTS-DPO against plain DPO on the same rollouts: held-out greedy accuracy of the SFT model
after (a) DPO on pivotal-token pairs and (b) DPO on whole correct-vs-incorrect responses,
both built from one Pivotal Token Search run per seed (the same rollouts, the same budget).

  python benchmarks/pts_vs_dpo.py --sft /tmp/phi4-sft --workdir /tmp/pts-exp --seeds 0,1,2 \
      --write benchmarks/RESULTS_pts.md --plot benchmarks/pts_vs_dpo.png

Per seed: `configs/pts_search.py:tiny` with `--config.seed=<seed>` searches `--questions`
training-stream questions; then `configs/dpo.py:tiny,pts` trains on `pairs-*.jsonl` and
`configs/dpo.py:tiny` on `responses-*.jsonl` (and nothing else: no refusal share), each for
`--dpo_steps` steps from the SFT checkpoint with the same seed, batch and learning rate;
accuracy is greedy on the first `--accuracy_problems` held-out problems (the eval span,
never searched). `--template reasoning --families modular` runs it on a reasoning-SFT model
of one family. Each run is the `python -m phi4_jax.main` command printed beside it, run in
this process (stages.run).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from phi4_jax import stages
from phi4_jax.config_base import load_config
from phi4_jax.data.sources import held_out_indices

_SFT = flags.DEFINE_string("sft", None, "The SFT run (workdir) both methods start from.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the searches and DPO runs go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Search and DPO seeds.")
_QUESTIONS = flags.DEFINE_integer("questions", 64, "Questions searched per seed.")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 16, "Most rollouts per prefix.")
_DPO_STEPS = flags.DEFINE_integer("dpo_steps", 40, "DPO steps of each method.")
_DPO_LR = flags.DEFINE_float("dpo_lr", 0.0, "DPO learning rate of each method (0: the tiny "
                             "config's); its runs go to dpo-*-lr<value> folders, so one "
                             "workdir holds several rates beside the searches they share.")
_PROBLEMS = flags.DEFINE_integer("accuracy_problems", 128, "Held-out problems for accuracy.")
_TEMPLATE = flags.DEFINE_enum("template", "chat", ["chat", "reasoning"],
                              "The SFT model's template (sft.template) for search, DPO and eval.")
_FAMILIES = flags.DEFINE_string("families", "", "Exercise families searched and evaluated "
                                "(pts.families, eval.accuracy_families); '' = all.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "Response budget of search and eval.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "The search's sampling temperature "
                                  "(pts.temperature): below 1 a weak model's success rates spread "
                                  "into the kept range.")
_WRITE = flags.DEFINE_string("write", "", "Append the results to this markdown file.")
_PLOT = flags.DEFINE_string("plot", "", "Save a bar chart here (needs matplotlib).")

COMMON = {"log.progress_bar": False, "log.tensorboard": False}


def _model_keys() -> dict:
    """The keys every run shares: how the SFT model is asked, and on which problems."""
    return {"sft.template": _TEMPLATE.value, "eval.accuracy_families": _FAMILIES.value,
            "eval.max_new_tokens": _MAX_NEW.value}


def _command(spec: str, workdir: str, overrides: dict) -> str:
    flags_ = " ".join(f"--config.{k}={v!r}" if isinstance(v, str) else f"--config.{k}={v}"
                      for k, v in overrides.items())
    return f"python -m phi4_jax.main --config={spec} --workdir={workdir} {flags_}"


def _run(spec: str, workdir: str, overrides: dict, log: list[str]) -> list[dict]:
    """Runs a config with dotted overrides in this process, recording the equivalent command."""
    file, arg = spec.split(":")
    config = load_config(file, arg)
    overrides = {**COMMON, **_model_keys(), **overrides}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[leaf] = value
    log.append(_command(spec, workdir, overrides))
    print(log[-1], flush=True)
    return stages.run(config, workdir)


def _lines(pattern: Path) -> int:
    return sum(1 for path in pattern.parent.glob(pattern.name) for _ in open(path))


def _holdout(records: int) -> float:
    """The smallest held-out fraction that leaves at least one pair for the eval split."""
    for fraction in (0.05, 0.1, 0.2, 0.3, 0.5):
        if len(held_out_indices(records, fraction)):
            return fraction
    return 0.5


def _dpo(spec: str, pairs: Path, workdir: str, seed: int, log: list[str]) -> dict:
    count = _lines(pairs)
    if count < 2:
        return {"pairs": count, "accuracy": float("nan")}
    overrides = {"init_from": _SFT.value, "seed": seed, "train.steps": _DPO_STEPS.value,
                 "train.warmup_steps": min(5, _DPO_STEPS.value),
                 "eval.every_steps": _DPO_STEPS.value, "eval.at_start": False,
                 "eval.accuracy_problems": _PROBLEMS.value, "eval.batches": 1,
                 "checkpoint.every_steps": _DPO_STEPS.value,
                 "data.eval_holdout": _holdout(count)}
    if _DPO_LR.value:
        overrides["train.lr"] = _DPO_LR.value
    overrides.update({"data.sources.pairs.kind": "jsonl", "data.sources.pairs.paths": str(pairs),
                      "data.mix.refusal": 0.0})  # each method trains on its own pairs only
    history = _run(spec, workdir, overrides, log)
    final = [h for h in history if "accuracy" in h][-1]
    return {"pairs": count, "accuracy": final["accuracy"],
            "reward_accuracy": final.get("eval_reward_accuracy", float("nan"))}


def _lr_suffix() -> str:
    return f"-lr{_DPO_LR.value:g}" if _DPO_LR.value else ""


def _sft_accuracy(workdir: str, log: list[str]) -> float:
    """The SFT model's accuracy: a zero-step evaluation through the DPO stage."""
    overrides = {"init_from": _SFT.value, "train.steps": 1, "train.warmup_steps": 0,
                 "train.lr": 1e-12,
                 "eval.at_start": True, "eval.every_steps": 1,
                 "eval.accuracy_problems": _PROBLEMS.value, "eval.batches": 1}
    history = _run("configs/dpo.py:tiny", workdir, overrides, log)
    return [h for h in history if "accuracy" in h][0]["accuracy"]


def _plot(rows: list[dict], sft: float, path: str) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    seeds = [r["seed"] for r in rows]
    x = np.arange(len(seeds))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [r["pts"]["accuracy"] for r in rows], 0.4, label="PTS-DPO (pivotal pairs)")
    ax.bar(x + 0.2, [r["dpo"]["accuracy"] for r in rows], 0.4, label="DPO (whole responses)")
    ax.axhline(sft, color="black", linestyle="--", label="SFT start")
    ax.set_xticks(x, [f"seed {s}" for s in seeds])
    ax.set_ylabel(f"greedy accuracy ({_PROBLEMS.value} held-out problems)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    root, log, rows = Path(_WORKDIR.value), [], []
    start = time.perf_counter()
    sft = _sft_accuracy(str(root / "sft-eval"), log)
    for seed in (int(s) for s in _SEEDS.value):
        search_dir = root / f"pts-s{seed}"
        t = time.perf_counter()
        totals = _run("configs/pts_search.py:tiny", str(search_dir),
                      {"init_from": _SFT.value, "seed": seed, "pts.questions": _QUESTIONS.value,
                       "pts.rollouts": _ROLLOUTS.value, "pts.families": _FAMILIES.value,
                       "pts.max_new_tokens": _MAX_NEW.value,
                       "pts.temperature": _TEMPERATURE.value}, log)[0]
        search_s = time.perf_counter() - t
        pts = _dpo("configs/dpo.py:tiny,pts", search_dir / "pts" / "pairs-*.jsonl",
                   str(root / f"dpo-pts-s{seed}{_lr_suffix()}"), seed, log)
        dpo = _dpo("configs/dpo.py:tiny", search_dir / "pts" / "responses-*.jsonl",
                   str(root / f"dpo-whole-s{seed}{_lr_suffix()}"), seed, log)
        rows.append({"seed": seed, "search": totals, "search_s": search_s, "pts": pts,
                     "dpo": dpo})
        print(json.dumps(rows[-1]), flush=True)
    _report(rows, sft, log, time.perf_counter() - start)


def _report(rows: list[dict], sft: float, log: list[str], seconds: float) -> None:
    table = ["| seed | questions kept | pivots | rollouts | rollouts/s | pivotal pairs | "
             "whole-response pairs | accuracy after PTS-DPO | after DPO |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["search"]
        table.append(f"| {r['seed']} | {s['kept']}/{s['questions']} | {s['pivots']} | "
                     f"{s['rollouts']} | {s['rollouts_per_s']:.1f} | {r['pts']['pairs']} | "
                     f"{r['dpo']['pairs']} | {r['pts']['accuracy']:.3f} | "
                     f"{r['dpo']['accuracy']:.3f} |")
    means = {k: np.nanmean([r[k]["accuracy"] for r in rows]) for k in ("pts", "dpo")}
    table.append(f"| mean | | | | | | | {means['pts']:.3f} | {means['dpo']:.3f} |")
    print("\n".join(table), flush=True)
    if _PLOT.value:
        _plot(rows, sft, _PLOT.value)
    if _WRITE.value:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        text = (f"\n## PTS-DPO vs DPO, run of {now}\n\n"
                f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
                f"cores, {jax.devices()[0].device_kind}; load average {os.getloadavg()}; "
                f"{seconds / 60:.0f} min in all\n"
                f"- command: `python benchmarks/pts_vs_dpo.py --sft {_SFT.value} --workdir "
                f"{_WORKDIR.value} --seeds {','.join(_SEEDS.value)} --questions "
                f"{_QUESTIONS.value} --rollouts {_ROLLOUTS.value} --dpo_steps "
                f"{_DPO_STEPS.value} --dpo_lr {_DPO_LR.value:g} --accuracy_problems {_PROBLEMS.value} --template "
                f"{_TEMPLATE.value} --families '{_FAMILIES.value}' --max_new_tokens "
                f"{_MAX_NEW.value} --temperature {_TEMPERATURE.value}`\n"
                f"- SFT start: greedy accuracy {sft:.3f} on the same held-out problems\n\n"
                + "\n".join(table) + "\n\nThe runs, as commands:\n\n```\n" + "\n".join(log)
                + "\n```\n")
        with open(_WRITE.value, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    flags.mark_flags_as_required(["sft", "workdir"])
    app.run(main)
