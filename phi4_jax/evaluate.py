r"""Scores a trained model on lm-evaluation-harness tasks with phi4_jax's own model and sampler:

    python -m phi4_jax.evaluate --config=configs/<stage>.py[:arg] --config.init_from=DIR \
        --tasks=a,b [--include_path=DIR] [--limit=N] [--num_fewshot=K] \
        [--apply_chat_template] [--batch_size=N] [--max_length=N] [--output=FILE] \
        [--log_samples] [--workdir=DIR] [--verbose]

`init_from` names a run's workdir, a step folder or a Hugging Face directory, read as
training reads it (`train.initial_params`); the config's `model.size` must match it and its
`mesh.*` places it. The requests run through the `phi4_jax` lm-eval model
(`evals.harness`). The command prints lm-eval's table, writes lm-eval's results JSON
(`--output`; default `<workdir>/lm_eval/results_step<N>.json`, with each request's samples
under `samples` with `--log_samples`) and each numeric metric as a TensorBoard scalar
`lm_eval/<task>/<metric>` at the checkpoint's step in `<workdir>/tensorboard`, beside the
run's training curves. The workdir is init_from's run (`--workdir` for a Hugging Face
directory or another folder); without one, only `--output` is written.

Tasks named only in `--include_path` are found without indexing lm-eval's ~15k built-in
tasks (a minute on a small CPU). Every check (the extra installed, the config, the task
names, the checkpoint's presence and shapes) runs before anything is loaded or compiled; a
mistake is one line, `error: ...`, exit status 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

from phi4_jax.errors import Phi4Error

CLOSE_NAMES = 5  # task names suggested for an unknown one


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """The command line as a flag set of its own, made per call: not absl's global set, which
    another entry point imported beside this one (tests do) would define `--config` in twice;
    and config_flags reads the `--config.*` overrides from the argv it is given."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. "
                                    "configs/sft.py:toy.", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_list("tasks", None, "lm-eval task, group or tag names (comma-separated).",
                      flag_values=values)
    flags.DEFINE_string("include_path", None, "A folder of extra task YAML files.",
                        flag_values=values)
    flags.DEFINE_integer("limit", None, "At most this many documents per task.",
                         flag_values=values)
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: each "
                         "task's own).", flag_values=values)
    flags.DEFINE_bool("apply_chat_template", False, "Lay prompts out in the model's chat format.",
                      flag_values=values)
    flags.DEFINE_integer("batch_size", 32, "Most requests run at once.", flag_values=values)
    flags.DEFINE_integer("max_length", None, "The context requests are cut to (default: "
                         "model.max_positions).", flag_values=values)
    flags.DEFINE_string("output", None, "The results JSON file.", flag_values=values)
    flags.DEFINE_bool("log_samples", False, "Also write each request and its response into the "
                      "results JSON.", flag_values=values)
    flags.DEFINE_string("workdir", None, "Where TensorBoard scalars and the default output go "
                        "(default: init_from's run workdir).", flag_values=values)
    flags.DEFINE_bool("verbose", False, "Show tracebacks and other libraries' INFO logs.",
                      flag_values=values)
    values(argv)
    return values


class EvaluateError(Phi4Error, ValueError):
    """An evaluation that cannot run as asked; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """A checked evaluation: the model to load, the tasks, where results go, at which step."""

    model: Any  # evals.harness.ModelPlan
    tasks: tuple[str, ...]
    task_manager: Any  # lm_eval.tasks.TaskManager
    output: Path | None
    workdir: Path | None
    step: int


def check_extra(chat: bool = False) -> None:
    """The `eval` extra (lm-eval), and for a chat template the `tokenizers` library that
    writes it, must be installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EvaluateError("evaluation runs lm-evaluation-harness, which is not installed; "
                            "pip install -e \".[eval]\".")
    if chat and importlib.util.find_spec("tokenizers") is None:
        raise EvaluateError("--apply_chat_template records the chat template with the "
                            "`tokenizers` library, which is not installed; pip install -e "
                            "\".[hf]\".")


def task_manager(tasks: list[str], include_path: str | None, builtin: bool = True):
    """lm-eval's task index holding every requested name (a glob counts when it matches one);
    the include path alone when it holds them all, else with lm-eval's built-in tasks (unless
    `builtin` is False). EvaluateError names an unknown task and the closest known names."""
    from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top  # [eval]

    if include_path is not None and not Path(include_path).is_dir():
        raise EvaluateError(f"--include_path={include_path}: no such folder; give a folder of "
                            f"task YAML files.")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or (builtin and unknown_tasks(tasks, manager.all_tasks)):
        manager = TaskManager(include_path=include_path, include_defaults=builtin)
    if missing := unknown_tasks(tasks, manager.all_tasks):
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=CLOSE_NAMES)
        hint = f"close names: {', '.join(close)}" if close else "no close name"
        raise EvaluateError(f"--tasks: unknown task {missing[0]!r} ({hint}); `lm_eval ls tasks` "
                            f"lists them, --include_path adds a folder of your own.")
    return manager


def unknown_tasks(tasks: list[str], known: list[str]) -> list[str]:
    """The requested names that name no task, group or tag and, as globs, match none."""
    from lm_eval.utils import pattern_match  # pylint: disable=g-import-not-at-top  # [eval]

    known_set = set(known)
    return [name for name in tasks if name not in known_set and not pattern_match([name], known)]


def plan(config, tasks: list[str] | None, *, include_path: str | None = None,
         output: str | None = None, workdir: str | None = None, chat: bool = False) -> EvalPlan:
    """Every check of the evaluation on metadata only; a Phi4Error names the first problem."""
    check_extra(chat)
    if not tasks:
        raise EvaluateError("--tasks is required: name lm-eval tasks, e.g. --tasks=hellaswag,"
                            "arc_easy.")
    manager = task_manager(tasks, include_path)
    from phi4_jax.evals import harness  # pylint: disable=g-import-not-at-top  # [eval]

    model = harness.plan_model(config)
    run_dir, step = _run_of(model.source)
    folder = Path(workdir) if workdir else run_dir
    if output:
        out = Path(output)
    else:
        out = folder / "lm_eval" / f"results_step{step}.json" if folder else None
    return EvalPlan(model, tuple(tasks), manager, out, folder, step)


def _run_of(source) -> tuple[Path | None, int]:
    """The workdir and step of a phi4_jax step folder (`<workdir>/checkpoints/<step>`);
    (None, 0) for a Hugging Face directory."""
    path = source.path.resolve()
    if source.kind == "phi4" and path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    return None, 0


def evaluate(eval_plan: EvalPlan, *, limit: int | None = None, num_fewshot: int | None = None,
             chat: bool = False, batch_size: int = 32, max_length: int | None = None,
             log_samples: bool = False) -> dict:
    """Loads the model, runs lm-eval's `simple_evaluate` with it; returns lm-eval's results."""
    from lm_eval import evaluator  # pylint: disable=g-import-not-at-top  # [eval]

    from phi4_jax.evals import harness  # pylint: disable=g-import-not-at-top  # [eval]

    lm = harness.Phi4LM(harness.load_model(eval_plan.model), batch_size=batch_size,
                        max_length=max_length)
    results = evaluator.simple_evaluate(
        model=lm, tasks=list(eval_plan.tasks), task_manager=eval_plan.task_manager, limit=limit,
        num_fewshot=num_fewshot, apply_chat_template=chat, log_samples=log_samples)
    return results


def numeric_metrics(results: dict) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` -> value for every number in lm-eval's results table; a
    filter other than `none` is kept in the name (`exact_match_flexible-extract`)."""
    scalars = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric, _, filter_name = key.partition(",")
                suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
                scalars[f"lm_eval/{task}/{metric}{suffix}"] = float(value)
    return scalars


def write_results(eval_plan: EvalPlan, results: dict) -> None:
    """The results JSON (`--output`) and the TensorBoard scalars (in the workdir)."""
    from lm_eval.utils import handle_non_serializable  # pylint: disable=g-import-not-at-top
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    if eval_plan.output is not None:
        eval_plan.output.parent.mkdir(parents=True, exist_ok=True)
        eval_plan.output.write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                               ensure_ascii=False) + "\n")
        print(f"Results: {eval_plan.output}")
    if eval_plan.workdir is None:
        logging.info("No workdir (init_from is no phi4_jax run and --workdir is unset): no "
                     "TensorBoard scalars written.")
        return
    writer = SummaryWriter(str(eval_plan.workdir / "tensorboard"))
    for tag, value in numeric_metrics(results).items():
        writer.add_scalar(tag, value, eval_plan.step)
    writer.close()
    print(f"TensorBoard: lm_eval/* at step {eval_plan.step} in {eval_plan.workdir / 'tensorboard'}")


def _flag_problem(argv: list[str], error: BaseException) -> str:
    """The `--config.*` override naming an undeclared key (with the closest keys), else the
    error's last line."""
    from phi4_jax import config_base  # pylint: disable=g-import-not-at-top

    spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if spec is not None and Path(spec.split(":", 1)[0]).is_file():
        config = config_base.load_config(spec)
        for arg in argv:
            if arg.startswith("--config."):
                dotted, _, value = arg[len("--config."):].partition("=")
                try:
                    config_base.check_override(config, dotted, value or "...")
                except config_base.ConfigError as unknown:
                    return str(unknown)
    return ([line.strip() for line in str(error).splitlines() if line.strip()] or
            [repr(error)])[-1]


def main(argv: list[str]) -> int:
    try:
        values = parse_flags(argv)
        config = values.config
    except (flags.Error, AttributeError, KeyError, OSError) as error:
        print(f"error: {_flag_problem(argv, error)}", file=sys.stderr)
        return 1
    from phi4_jax.train import metrics  # pylint: disable=g-import-not-at-top

    metrics.configure_console(values.verbose)
    try:
        if config is None:
            raise EvaluateError("--config is required: python -m phi4_jax.evaluate "
                                "--config=configs/<stage>.py:<arg> --config.init_from=DIR "
                                "--tasks=a,b")
        eval_plan = plan(config, values.tasks, include_path=values.include_path,
                         output=values.output, workdir=values.workdir,
                         chat=values.apply_chat_template)
        results = evaluate(eval_plan, limit=values.limit, num_fewshot=values.num_fewshot,
                           chat=values.apply_chat_template, batch_size=values.batch_size,
                           max_length=values.max_length, log_samples=values.log_samples)
    except Phi4Error as error:
        if values.verbose:
            logging.exception("evaluation failed")
        print(f"error: {error}", file=sys.stderr)
        return 1
    from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top  # [eval]

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    write_results(eval_plan, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
