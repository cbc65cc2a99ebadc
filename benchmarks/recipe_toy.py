r"""The recipe in miniature: does each post-training stage make the toy model better at a skill?

  python benchmarks/recipe_toy.py --workdir /tmp/recipe --seeds 0,1,2 \
      --write benchmarks/RESULTS_recipe.md --plot benchmarks/recipe_toy.png

The chain, each step a `python -m phi4_jax.main` command as a user would type it (printed,
and kept in the report): pretraining on the `column_addition_4` drill (`toy` size, 512-id
byte tokenizer), reasoning SFT until greedy accuracy on a validation set (held-out problems
apart from the reported ones) reaches `--sft_stop_accuracy`, then from that one SFT checkpoint (a) GRPO, (b) Pivotal Token
Search, (c) PTS-DPO on its pivotal-token pairs and (d) whole-response DPO on the correct vs
incorrect responses of the same rollouts. Pretraining runs once (`--pretrain_seed`, or
`--pretrain DIR` reuses a finished run); each seed runs SFT and every later stage with
`--config.seed` and `--config.data.seed` set to it, so its held-out problems (the synthetic
eval span, never trained on) are its own and shared by all of its stages.

Runs that do not wait on each other (the seeds; GRPO beside PTS and its DPO runs) go side by
side, at most `--workers` processes at once, each pinned to its own core with `taskset` where
it exists. A finished run leaves `<run>.done` and is not run again, so a stopped experiment
resumes where it stopped.

Reported per seed: held-out greedy accuracy with its Wilson 95% interval, `accuracy_baseline`,
`answer_mode_share` and response length after each stage; GRPO's reward and accuracy curves;
where each PTS pivot lies (the column lines or the `So ...` sum line inside the think block,
or the final answer after it) with examples in context.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import math
import os
import platform
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags

# The script's own flags, apart from absl's global ones: tests import its helpers beside other
# scripts that define flags of the same names.
FLAGS = flags.FlagValues()


def _define(kind: str, *args):
    return getattr(flags, f"DEFINE_{kind}")(*args, flag_values=FLAGS)


_WORKDIR = _define("string", "workdir", None, "Where every run of the experiment goes.")
_SEEDS = _define("list", "seeds", ["0", "1", "2"], "Seeds of SFT and the later stages.")
_PRETRAIN = _define("string", "pretrain", "", "A finished pretraining run to start from "
                    "instead of pretraining here.")
_PRETRAIN_SEED = _define("integer", "pretrain_seed", 0, "The pretraining run's seed.")
_FAMILY = _define("string", "family", "column_addition_4", "The exercise family of every stage.")
_PRETRAIN_STEPS = _define("integer", "pretrain_steps", 1500, "Pretraining steps (16 x 256).")
_SFT_MAX_STEPS = _define("integer", "sft_max_steps", 400, "Most reasoning SFT steps (16 x 320), "
                         "at a constant learning rate after warm-up.")
_SFT_STOP = _define("float", "sft_stop_accuracy", 0.4, "SFT stops at the first validation eval "
                    "whose greedy accuracy reaches this (eval.stop_at_accuracy).")
_SFT_EVAL_EVERY = _define("integer", "sft_eval_every", 10, "SFT's validation eval interval.")
_VALIDATION = _define("integer", "validation_problems", 64, "Problems of the validation set "
                      "SFT's stopping rule reads: the eval span's problems from index "
                      "VALIDATION_OFFSET on, apart from the reported ones.")
_SFT_MORE = _define("integer", "sft_more_steps", 50, "A baseline beside GRPO: the same SFT run "
                    "this many steps past where it stopped (0: none).")
_GRPO_STEPS = _define("integer", "grpo_steps", 80, "GRPO steps.")
_GRPO_PROBLEMS = _define("integer", "grpo_problems", 16, "GRPO problems per step.")
_GRPO_GROUP = _define("integer", "grpo_group", 8, "GRPO responses per problem.")
_GRPO_LR = _define("float", "grpo_lr", 1e-4, "GRPO learning rate.")
_GRPO_REWARD = _define("enum", "grpo_reward", "simple", ["simple", "phi4_reasoning"],
                       "grpo.reward; phi4_reasoning scales its lengths to the budget.")
_QUESTIONS = _define("integer", "pts_questions", 64, "Training questions PTS searches.")
_ROLLOUTS = _define("integer", "pts_rollouts", 16, "Most rollouts per PTS prefix.")
_PTS_TEMPERATURE = _define("float", "pts_temperature", 0.8, "PTS's sampling temperature "
                           "(GRPO samples at 0.8 too).")
_DPO_STEPS = _define("integer", "dpo_steps", 40, "Steps of each DPO run.")
_DPO_LR = _define("float", "dpo_lr", 0.0, "Learning rate of both DPO runs (0: the config's); "
                  "other than 0 their runs are named `-lr<value>`, so an ablation "
                  "reuses the workdir's SFT, GRPO and PTS runs.")
_PROBLEMS = _define("integer", "problems", 256, "Held-out problems of the stage runs' own "
                    "evals (GRPO's curve).")
_FINAL_PROBLEMS = _define("integer", "final_problems", 1024, "Held-out problems of the reported "
                          "accuracies: an evaluate-only run (train.steps=0) on each stage's "
                          "final checkpoint.")
_MAX_NEW = _define("integer", "max_new_tokens", 192, "Response budget of every stage.")
_WITH_PTS = _define("bool", "pts", True, "Also run PTS, PTS-DPO and DPO (--nopts: "
                    "pretraining, SFT and GRPO only, the quick look).")
_WORKERS = _define("integer", "workers", os.cpu_count() or 1, "Seeds run at once.")
_WRITE = _define("string", "write", "", "Append the report to this markdown file.")
_PLOT = _define("string", "plot", "", "Save the figure here (needs matplotlib).")

# A 2-layer byte model does not learn to read the question's first operand behind the default
# 194-byte system text within the SFT budget; this one it does (RESULTS_recipe.md, tuning).
SYSTEM = "Reason inside <think> and </think>, then give the final answer."
SFT_LEN = 320  # one 4-digit conversation with the short system text is ~300 byte tokens
VALIDATION_OFFSET = 2**20  # far past the reported problems, which start at index 0
STEP_LINE = re.compile(r"\] step (\d+): (.*)$")


def _flag(key: str, value) -> str:
    """One `--config.key=value` word as a shell reads it (dicts in double quotes)."""
    word = f"--config.{key}={value!r}" if isinstance(value, dict) else f"--config.{key}={value}"
    if not re.search(r"[^\w@%+=:,./-]", word):
        return word
    return shlex.quote(word) if set('"$`\\!') & set(word) else f'"{word}"'


def command(spec: str, workdir: Path, overrides: dict) -> str:
    return " ".join([f"python -m phi4_jax.main --config={spec} --workdir={workdir}",
                     *(_flag(k, v) for k, v in overrides.items())])


def _model_keys(seed: int) -> dict:
    """What every run after pretraining shares: the template, the task and its budget."""
    f, m = _FAMILY.value, _MAX_NEW.value
    return {"reasoning.system": SYSTEM, "sft.template": "reasoning", "seed": seed,
            "data.seed": seed, "eval.accuracy_families": f, "eval.accuracy_problems":
            _PROBLEMS.value, "eval.max_new_tokens": m, "eval.batches": 1,
            "train.seq_len": SFT_LEN, "log.progress_bar": False}


class Runner:
    """Runs main commands, one per core at a time, each once (`<run>.done` marks it)."""

    def __init__(self, root: Path, workers: int):
        self.root, self.log, self.names = root, [], []
        self.cores = queue.Queue()
        for core in range(workers):
            self.cores.put(core)
        self.pin = workers > 1 and shutil.which("taskset") is not None

    def __call__(self, name: str, spec: str, overrides: dict, pin: bool = True) -> Path:
        """Runs `spec` in `<root>/<name>`; `pin=False` lets a run that has the machine to
        itself use every core."""
        workdir = self.root / name
        line = command(spec, workdir, overrides)
        self.log.append(line)
        self.names.append(name)
        done = self.root / f"{name}.done"
        if done.exists():
            return workdir
        core = self.cores.get()
        try:
            argv = shlex.split(line)
            argv[0] = sys.executable
            if self.pin and pin:
                argv = ["taskset", "-c", str(core), *argv]
            print(f"[core {core}] {line}", flush=True)
            start = time.perf_counter()
            with open(self.root / f"{name}.out", "w", encoding="utf-8") as out:
                code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=Path(__file__).resolve().parents[1])
            if code:
                tail = (self.root / f"{name}.out").read_text(encoding="utf-8")[-2000:]
                raise RuntimeError(f"{name} failed (exit {code}):\n{tail}")
            done.write_text(f"{time.perf_counter() - start:.1f}\n", encoding="utf-8")
            return workdir
        finally:
            self.cores.put(core)

    def seconds(self, name: str) -> float:
        return float((self.root / f"{name}.done").read_text(encoding="utf-8"))


def history(workdir: Path) -> list[tuple[int, dict]]:
    """The (step, scalars) lines a run logged, in order."""
    rows = []
    for line in (workdir / "logs" / "process_0.log").read_text(encoding="utf-8").splitlines():
        if match := STEP_LINE.search(line):
            scalars = dict(part.split("=", 1) for part in match.group(2).split())
            rows.append((int(match.group(1)), {k: float(v) for k, v in scalars.items()}))
    return rows


def final_eval(workdir: Path) -> dict:
    return [s for _, s in history(workdir) if "accuracy" in s][-1]


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed in n trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def pivot_place(prefix: str) -> str:
    """Where a pivot lies: 'answer' (after the think block), 'sum' (the `So a+b=c.` line) or
    'columns' (a column line, or before the first)."""
    if "</think>" in prefix:
        return "answer"
    return "sum" if prefix.rsplit("\n", 1)[-1].startswith("So ") else "columns"


def _jsonl(pattern: str, folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob(pattern))
            for line in path.read_text(encoding="utf-8").splitlines() if line]


def _holdout(records: int) -> float:
    """The smallest held-out share of pairs that leaves at least one for DPO's eval loss."""
    return next((f for f in (0.05, 0.1, 0.2, 0.3, 0.5) if records * f >= 1), 0.5)


def pretrain(run: Runner) -> Path:
    if _PRETRAIN.value:
        return Path(_PRETRAIN.value)
    steps, seed = _PRETRAIN_STEPS.value, _PRETRAIN_SEED.value
    return run("pretrain", "configs/pretrain.py:toy", {
        "data.sources.synthetic.families": _FAMILY.value, "data.mix": {"synthetic": 1.0},
        "train.steps": steps, "train.seq_len": 256, "train.global_batch": 16,
        "eval.every_steps": max(1, steps // 3), "checkpoint.every_steps": steps,
        "seed": seed, "data.seed": seed, "log.progress_bar": False}, pin=False)


def one_seed(run: Runner, start: Path, seed: int) -> dict:
    """SFT from `start`, then from its checkpoint GRPO beside PTS (whose two DPO runs follow),
    then every stage's final checkpoint evaluated on the same `--final_problems` problems."""
    keys, s = _model_keys(seed), f"s{seed}"
    sft = _sft(run, keys, start, f"sft-{s}", _SFT_MAX_STEPS.value, _SFT_STOP.value)
    stop_step, stopped = [(step, sc) for step, sc in history(sft) if "accuracy" in sc][-1]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as branches:
        grpo = branches.submit(_grpo, run, keys, sft, s)
        more = stop_step + _SFT_MORE.value
        longer = (branches.submit(_sft, run, keys, start, f"sft{more}-{s}", more)
                  if _SFT_MORE.value else None)
        search, pairs = _search(run, keys, sft, s, branches) if _WITH_PTS.value else (None, {})
        runs = {"sft": sft, "grpo": grpo.result(), "sft_more": longer and longer.result()}
        result = {"seed": seed, "sft_stop": (stop_step, stopped["accuracy"]),
                  "grpo_curve": history(runs["grpo"]),
                  "search": _jsonl("questions-*.jsonl", search / "pts") if search else [],
                  "pivots": _jsonl("pairs-*.jsonl", search / "pts") if search else [],
                  "seconds": {n: run.seconds(f"{n}-{s}") for n in ("sft", "grpo")}}
        if longer:
            result["seconds"]["sft_more"] = run.seconds(f"sft{more}-{s}")
        if search:
            result["seconds"]["pts"] = run.seconds(f"pts-{s}")
        for name, future in pairs.items():
            result[f"{name}_pairs"], runs[name], result["seconds"][name] = future.result()
        finals = {name: branches.submit(_evaluate, run, keys, workdir)
                  for name, workdir in runs.items() if workdir}
        for key, _ in STAGES:
            result[key] = finals[key].result() if key in finals else None
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("grpo_curve", "search", "pivots")}), flush=True)
    return result


def _evaluate(run: Runner, keys: dict, workdir: Path) -> dict:
    """The final eval of a stage's checkpoint on `--final_problems` held-out problems: an
    evaluate-only run (train.steps=0), the same for every stage."""
    return final_eval(run(f"eval-{workdir.name}", "configs/reasoning_sft.py:toy", {
        **keys, "init_from": workdir, "train.steps": 0,
        "eval.accuracy_problems": _FINAL_PROBLEMS.value,
        "data.sources.chat.families": _FAMILY.value, "data.mix": {"chat": 1.0}}))


def _sft(run: Runner, keys: dict, start: Path, name: str, steps: int, stop: float = 0.0
         ) -> Path:
    """SFT for `steps`, or with `stop` until its validation accuracy reaches it; the validation
    problems are not the reported ones, which GRPO's first eval measures on the checkpoint."""
    overrides = {**keys, "init_from": start, "data.sources.chat.families": _FAMILY.value,
                 "data.mix": {"chat": 1.0}, "train.steps": steps, "train.global_batch": 16,
                 # constant: N steps are the first N of a longer run
                 "train.final_lr_fraction": 1.0,
                 "eval.every_steps": steps, "checkpoint.every_steps": steps}
    if stop:
        overrides.update({"eval.accuracy_problems": _VALIDATION.value,
                          "eval.accuracy_offset": VALIDATION_OFFSET,
                          "eval.stop_at_accuracy": stop,
                          "eval.every_steps": _SFT_EVAL_EVERY.value})
    return run(name, "configs/reasoning_sft.py:toy", overrides)


def _search(run: Runner, keys: dict, sft: Path, s: str, pool) -> tuple[Path, dict]:
    """The PTS run, and its two DPO runs submitted to `pool`."""
    search = run(f"pts-{s}", "configs/pts_search.py:toy", {
        **keys, "init_from": sft, "pts.families": _FAMILY.value,
        "pts.questions": _QUESTIONS.value, "pts.rollouts": _ROLLOUTS.value,
        "pts.max_new_tokens": _MAX_NEW.value, "pts.temperature": _PTS_TEMPERATURE.value})
    lr = f"-lr{_DPO_LR.value:g}" if _DPO_LR.value else ""  # an ablation beside the others
    return search, {name: pool.submit(_dpo, run, keys, sft, f"{name}-{s}{lr}", spec,
                                      search / "pts" / files)
                    for name, spec, files in (("pts_dpo", "configs/dpo.py:toy,pts",
                                               "pairs-*.jsonl"),
                                              ("dpo", "configs/dpo.py:toy", "responses-*.jsonl"))}


def _grpo(run: Runner, keys: dict, sft: Path, s: str) -> Path:
    steps = _GRPO_STEPS.value
    overrides = {**keys, "init_from": sft, "data.sources.problems.families": _FAMILY.value,
                 "grpo.max_new_tokens": _MAX_NEW.value, "train.steps": steps,
                 "train.global_batch": _GRPO_PROBLEMS.value, "grpo.group_size": _GRPO_GROUP.value,
                 "train.lr": _GRPO_LR.value, "grpo.reward": _GRPO_REWARD.value,
                 "eval.at_start": True, "eval.every_steps": max(1, steps // 3),
                 "log.every_steps": max(1, steps // 30), "checkpoint.every_steps": steps}
    if _GRPO_REWARD.value == "phi4_reasoning":
        overrides["grpo.reward_length_scale"] = _MAX_NEW.value / 31744
    return run(f"grpo-{s}", "configs/grpo.py:toy", overrides)


def _dpo(run: Runner, keys: dict, sft: Path, name: str, spec: str, pairs: Path
         ) -> tuple[int, Path | None, float]:
    """(pair count, workdir, seconds) of a DPO run on `pairs` (none under 2 pairs)."""
    count = len(_jsonl(pairs.name, pairs.parent))
    if count < 2:
        return count, None, float("nan")
    overrides = {**keys, "init_from": sft, "train.steps": _DPO_STEPS.value,
                 "train.warmup_steps": min(5, _DPO_STEPS.value),
                 "eval.every_steps": _DPO_STEPS.value, "eval.at_start": False,
                 "checkpoint.every_steps": _DPO_STEPS.value, "data.sources.pairs.kind": "jsonl",
                 "data.sources.pairs.paths": str(pairs), "data.mix": {"pairs": 1.0},
                 "data.eval_holdout": _holdout(count)}
    if _DPO_LR.value:
        overrides["train.lr"] = _DPO_LR.value
    return count, run(name, spec, overrides), run.seconds(name)


def main(argv):
    del argv
    root = Path(_WORKDIR.value)
    root.mkdir(parents=True, exist_ok=True)
    run = Runner(root, max(1, _WORKERS.value))
    start = time.perf_counter()
    base = pretrain(run)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(_SEEDS.value)) as pool:
        rows = list(pool.map(lambda seed: one_seed(run, base, int(seed)), _SEEDS.value))
    report(rows, run, base, time.perf_counter() - start)


STAGES = (("sft", "SFT (start)"), ("grpo", "GRPO"), ("pts_dpo", "PTS-DPO"),
          ("dpo", "DPO (whole responses)"), ("sft_more", "SFT, more steps"))


def _cell(scores: dict | None) -> str:
    if scores is None:
        return "-"
    lo, hi = wilson(scores["accuracy"], _FINAL_PROBLEMS.value)
    return f"{scores['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def accuracy_table(rows: list[dict]) -> list[str]:
    n = _FINAL_PROBLEMS.value

    def apart(a: dict, b: dict) -> str:
        """Whether a's interval lies wholly above b's."""
        return "yes" if wilson(a["accuracy"], n)[0] > wilson(b["accuracy"], n)[1] else "no"

    def gain(a: dict | None, b: dict | None) -> str:
        return f"{(a['accuracy'] - b['accuracy']) * 100:+.1f} pts" if a and b else "-"

    lines = ["| seed | SFT stopped at (validation accuracy) | "
             + " | ".join(title for _, title in STAGES) + " | GRPO - SFT | "
             "GRPO above SFT (intervals apart) | PTS-DPO - DPO |",
             "|---:|---:|" + "---|" * len(STAGES) + "---:|---|---:|"]
    for r in rows:
        step, validation = r["sft_stop"]
        lines.append(f"| {r['seed']} | step {step} ({validation:.3f}) | "
                     + " | ".join(_cell(r[k]) for k, _ in STAGES)
                     + f" | {gain(r['grpo'], r['sft'])} | {apart(r['grpo'], r['sft'])} | "
                     f"{gain(r['pts_dpo'], r['dpo'])} |")
    means = [np.mean([r[k]["accuracy"] for r in rows if r[k]]) if any(r[k] for r in rows)
             else float("nan") for k, _ in STAGES]
    lines.append("| mean | | " + " | ".join(f"{m:.3f}" if np.isfinite(m) else "-" for m in means)
                 + " | | | |")
    return lines


def detail_table(rows: list[dict]) -> list[str]:
    lines = ["| seed | stage | accuracy_baseline | answer_mode_share | response tokens | "
             "pairs | one-core minutes |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for key, title in STAGES:
            scores = r[key]
            if scores is None:
                continue
            pairs = r.get(f"{key}_pairs", "")
            lines.append(f"| {r['seed']} | {title} | {scores['accuracy_baseline']:.3f} | "
                         f"{scores['answer_mode_share']:.3f} | "
                         f"{scores.get('greedy_response_tokens', float('nan')):.0f} | {pairs} | "
                         f"{r['seconds'].get(key, float('nan')) / 60:.1f} |")
    return lines


def search_table(rows: list[dict]) -> tuple[list[str], list[str]]:
    lines = ["| seed | questions kept | pivots | in column lines | in the sum line | "
             "at the final answer | worked-step share | rollouts | search minutes |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    examples = []
    for r in rows:
        places = [pivot_place(p["prefix_text"]) for p in r["pivots"]]
        counts = {k: places.count(k) for k in ("columns", "sum", "answer")}
        share = (counts["columns"] + counts["sum"]) / max(1, len(places))
        kept = sum(q.get("kept", False) for q in r["search"])
        lines.append(f"| {r['seed']} | {kept}/{len(r['search'])} | {len(places)} | "
                     f"{counts['columns']} | {counts['sum']} | {counts['answer']} | "
                     f"{share:.2f} | {sum(q.get('rollouts', 0) for q in r['search'])} | "
                     f"{r['seconds']['pts'] / 60:.1f} |")
        for place in ("columns", "sum", "answer"):
            pick = next((p for p, at in zip(r["pivots"], places) if at == place), None)
            if pick:
                tail = pick["prefix_text"][-90:].replace("\n", "⏎")
                examples.append(f"- seed {r['seed']}, {place}: `…{tail}` then "
                                f"`{pick['chosen_text']!r}` (p {pick['chosen_success_rate']:.2f}) "
                                f"over `{pick['rejected_text']!r}` "
                                f"(p {pick['rejected_success_rate']:.2f})")
    return lines, examples


def curve_table(rows: list[dict]) -> list[str]:
    lines = [f"| seed | step | reward | sampled accuracy | held-out accuracy ({_PROBLEMS.value}) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        evals = {step: s["accuracy"] for step, s in r["grpo_curve"] if "accuracy" in s}
        logged = {step: s for step, s in r["grpo_curve"] if "reward" in s}
        for step, s in sorted({**{st: {} for st in evals}, **logged}.items()):
            if step in evals or step % max(1, _GRPO_STEPS.value // 6) == 0:
                held = f"{evals[step]:.3f}" if step in evals else ""
                sampled = (f"{s['reward']:.3f} | {s['sample_accuracy']:.3f}" if "reward" in s
                           else " | ")
                lines.append(f"| {r['seed']} | {step} | {sampled} | {held} |")
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(STAGES)
    for i, (key, title) in enumerate(STAGES):
        x = np.arange(len(rows)) + (i - (len(STAGES) - 1) / 2) * width
        acc = np.array([r[key]["accuracy"] if r[key] else np.nan for r in rows])
        bounds = np.array([wilson(a, _FINAL_PROBLEMS.value) if np.isfinite(a) else (np.nan, np.nan)
                           for a in acc])
        if key in ("pts_dpo", "dpo") and _DPO_LR.value:
            title += f", lr {_DPO_LR.value:g}"
        bars.bar(x, acc, width, yerr=[acc - bounds[:, 0], bounds[:, 1] - acc], capsize=2,
                 label=title)
    bars.set_xticks(np.arange(len(rows)), [f"seed {r['seed']}" for r in rows])
    bars.set_ylabel(f"held-out greedy accuracy ({_FINAL_PROBLEMS.value} problems, 95% CI)")
    bars.set_ylim(0, 1.15)
    bars.legend(fontsize=7, loc="upper center", ncol=3)
    for r in rows:
        steps = [st for st, s in r["grpo_curve"] if "accuracy" in s]
        acc = [s["accuracy"] for _, s in r["grpo_curve"] if "accuracy" in s]
        line, = curves.plot(steps, acc, marker="o",
                            label=f"seed {r['seed']} held-out (greedy, {_PROBLEMS.value})")
        sampled = [(st, s["sample_accuracy"]) for st, s in r["grpo_curve"] if "reward" in s]
        curves.plot(*zip(*sampled), color=line.get_color(), alpha=0.4, linestyle="--",
                    label=f"seed {r['seed']} sampled (T 0.8)")
    curves.set_xlabel("GRPO step")
    curves.set_ylabel("accuracy")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(rows: list[dict], run: Runner, base: Path, seconds: float) -> None:
    searched, examples = search_table(rows) if _WITH_PTS.value else ([], [])
    sections = [("Held-out greedy accuracy, Wilson 95% intervals", accuracy_table(rows)),
                ("Baselines and lengths", detail_table(rows)),
                ("Where PTS finds its pivots", searched),
                ("GRPO curves", curve_table(rows))]
    sections = [(title, lines) for title, lines in sections if lines]
    text = "\n\n".join(f"### {title}\n\n" + "\n".join(lines) for title, lines in sections)
    if examples:
        text += "\n\nPivots in context (the prefix's last 90 characters, ⏎ a newline):\n\n"
        text += "\n".join(examples)
    print(text, flush=True)
    if _WRITE.value:
        write(text, run, base, seconds)
    if _PLOT.value:
        plot(rows, _PLOT.value)


def write(text: str, run: Runner, base: Path, seconds: float) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    argv = " ".join(shlex.quote(a) for a in sys.argv)
    header = (f"\n## Run of {now}\n\n"
              f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
              f"{jax.devices()[0].device_kind}; load average at the end {os.getloadavg()}; "
              f"{seconds / 60:.0f} min in this invocation (runs finished earlier are reused), "
              f"{sum(map(run.seconds, dict.fromkeys(run.names))) / 60:.0f} min of runs in all, "
              f"{run.cores.qsize()} at a time\n"
              f"- versions: Python {platform.python_version()}, jax {jax.__version__}\n"
              f"- command: `python {argv}`\n- pretraining: {base}\n\n")
    runs = "\n\nThe runs, as commands:\n\n```\n" + "\n".join(dict.fromkeys(run.log)) + "\n```\n"
    with open(_WRITE.value, "a", encoding="utf-8") as f:
        f.write(header + text + runs)


if __name__ == "__main__":
    try:
        FLAGS(sys.argv)
    except flags.Error as error:
        sys.exit(f"recipe_toy.py: {error}")
    if not _WORKDIR.value:
        sys.exit("recipe_toy.py: give --workdir.")
    main(sys.argv)
