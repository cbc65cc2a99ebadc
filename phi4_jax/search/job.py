"""The Pivotal Token Search job (`stage='pts_search'`): a trained model's responses to built-in
questions searched for pivotal tokens, written as PTS-DPO pairs.

  python -m phi4_jax.main --config=configs/pts_search.py:tiny --workdir=/tmp/phi4-pts \
      --config.init_from=/tmp/phi4-sft

Questions `pts.first_question ...` of the task's training stream (never the held-out span
that greedy accuracy is measured on) are split over processes (question q goes to process
q mod count); each process holds the model on its own devices, its rollouts sharded over
their batch axes, and writes its own shard under `<workdir>/pts/`:
  pairs-<i>-of-<n>.jsonl      pivotal-token pairs (`dpo.pair_format='pivotal_token'` input)
  responses-<i>-of-<n>.jsonl  whole-response (correct, incorrect) pairs from the same rollouts
  questions-<i>-of-<n>.jsonl  one line per finished question: the resume log
A question's pairs are written and synced before its line in the log, and a restart cuts
both pair files back to the offsets the last complete log line records, so a question is
either wholly in the output or searched again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import tqdm

from phi4_jax.config_base import check_families, validate_config
from phi4_jax.data import synthetic
from phi4_jax.data.synthetic import reasoning
from phi4_jax.data.tokenizer import Phi4Tokenizer, load_tokenizer, tokenizer_for_vocab
from phi4_jax.evals.verifiable import chat_prompt
from phi4_jax.errors import ConfigError, Phi4Error, require
from phi4_jax.model.config import ModelConfig
from phi4_jax.parallel.sharding import MESH_AXES, logical_rules, logical_to_spec, make_mesh
from phi4_jax.sampling import decode
from phi4_jax.search import records
from phi4_jax.search.estimates import RolloutPolicy, estimate_prefixes
from phi4_jax.search.model_scorer import QuestionRollouts, RolloutModel
from phi4_jax.search.pivotal_tokens import SPLIT_RULES, QuestionSearch, search_question
from phi4_jax.search.sandbox import Limits
from phi4_jax.search.verifiers import TASKS, Problem, check_all, problem
from phi4_jax.train import initial_params
from phi4_jax.train.state import abstract_model, announce_model, resolve_attention


class ShardFilesError(Phi4Error, RuntimeError):
    """The output folder holds another run's layout; the message says how to go on."""


class ShardFiles:
    """This process's three output files, opened for appending after cutting back whatever
    a crash left after the last complete question."""

    def __init__(self, folder: Path, index: int, count: int):
        folder.mkdir(parents=True, exist_ok=True)
        others = sorted(p.name for p in folder.glob("questions-*.jsonl")
                        if not p.name.endswith(f"-of-{count:05d}.jsonl"))
        if others:
            raise ShardFilesError(
                f"{folder} holds {others[0]}, written by a run with another process count; "
                f"resume with that many processes or use a new --workdir.")
        name = f"{index:05d}-of-{count:05d}.jsonl"
        self.paths = {kind: folder / f"{kind}-{name}" for kind in ("pairs", "responses",
                                                                    "questions")}
        self.finished = self._repair()
        self.files = {kind: open(path, "ab") for kind, path in self.paths.items()}

    def _repair(self) -> dict[int, dict]:
        """Finished questions by id, from the log's complete lines; cuts the rest."""
        log = self.paths["questions"]
        data = log.read_bytes() if log.exists() else b""
        complete = data[:data.rfind(b"\n") + 1]
        lines = [json.loads(line) for line in complete.splitlines()]
        for kind in ("pairs", "responses"):
            path, end = self.paths[kind], (lines[-1][f"{kind}_end"] if lines else 0)
            with open(path, "ab") as f:
                f.truncate(end)
        with open(log, "ab") as f:
            f.truncate(len(complete))
        return {line["question_id"]: line for line in lines}

    def commit(self, summary: dict, pairs: Sequence[dict], responses: Sequence[dict]) -> None:
        """Appends one question's records, then its log line, each file synced to disk."""
        ends = {}
        for kind, lines in (("pairs", pairs), ("responses", responses)):
            _append(self.files[kind], lines)
            ends[f"{kind}_end"] = self.files[kind].tell()
        _append(self.files["questions"], [{**summary, **ends}])
        self.finished[summary["question_id"]] = summary

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _append(f, lines: Iterable[dict]) -> None:
    f.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())


class Progress:
    """Questions done, kept, pivots and pairs found, and rollouts per second: a bar on
    process 0 and a log line every `every` questions on each process."""

    def __init__(self, total: int, finished: Iterable[dict], *, bar: bool, every: int):
        self.totals = {"questions": 0, "kept": 0, "pivots": 0, "pairs": 0, "response_pairs": 0,
                       "rollouts": 0}
        for summary in finished:
            self.add(summary)
        self.start, self.new_rollouts, self.every = time.perf_counter(), 0, every
        self.bar = tqdm.tqdm(total=total, initial=self.totals["questions"], unit="question",
                             dynamic_ncols=True) if bar and jax.process_index() == 0 else None

    def add(self, summary: dict) -> None:
        t = self.totals
        t["questions"] += 1
        for key in ("kept", "pivots", "pairs", "response_pairs", "rollouts"):
            t[key] += int(summary.get(key, 0))

    def update(self, summary: dict) -> None:
        self.add(summary)
        self.new_rollouts += summary.get("rollouts", 0)
        line = self.line()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(line, refresh=False)
        if self.totals["questions"] % self.every == 0:
            logging.info("pts process %d: %s", jax.process_index(), line)

    def rollouts_per_second(self) -> float:
        return self.new_rollouts / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        t = self.totals
        return (f"questions={t['questions']} kept={t['kept']} pivots={t['pivots']} "
                f"pairs={t['pairs']} rollouts/s={self.rollouts_per_second():.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def question_ids(pts: ml_collections.ConfigDict, index: int, count: int) -> list[int]:
    """This process's questions: ids first_question + i with i = index mod count."""
    return list(range(pts.first_question + index, pts.first_question + pts.questions, count))


def policy_of(pts: ml_collections.ConfigDict) -> RolloutPolicy:
    return RolloutPolicy(pts.rollouts, pts.rollouts_per_round or pts.rollouts, pts.confidence,
                         pts.p_gap)


def search_with(sampler, pts: ml_collections.ConfigDict) -> QuestionSearch:
    """One question's search over a rollout sampler, as the config sets it."""
    scorer = functools.partial(estimate_prefixes, sample=sampler, policy=policy_of(pts))
    return search_question(scorer, p_gap=pts.p_gap,
                           success_range=(pts.min_success, pts.max_success),
                           responses=pts.responses_per_question, split=pts.split)


def search_questions(ids: Sequence[int], search_one: Callable[[int], tuple[dict, list, list]],
                     shard: ShardFiles, progress: Progress) -> None:
    """Searches every question not yet finished, committing each as it completes."""
    for question_id in ids:
        if question_id in shard.finished:
            continue
        summary, pairs, responses = search_one(question_id)
        shard.commit(summary, pairs, responses)
        progress.update(summary)


def response_outcomes(responses: Sequence[Sequence[int]], *, problem_: Problem,
                      tokenizer: Phi4Tokenizer, stop_ids: Sequence[int], workers: int
                      ) -> list[bool]:
    """Verdicts on whole responses (token ids), decoded without stop tokens; the question
    is not part of what is checked."""
    texts = [tokenizer.decode([t for t in r if t not in stop_ids]) for r in responses]
    return check_all(problem_, texts, workers)


class _ModelSearch:
    """question id -> (summary, pivotal pairs, whole-response pairs), with the model."""

    def __init__(self, config: ml_collections.ConfigDict, model: RolloutModel,
                 tokenizer: Phi4Tokenizer):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.stop_ids = model.sampling.stop_ids
        self.fmt = reasoning.format_for(config)
        self.families = synthetic.parse_families(config.pts.families, "pts.families")

    def __call__(self, question_id: int) -> tuple[dict, list, list]:
        pts, start = self.config.pts, time.perf_counter()
        problem_ = problem(pts.task, self.config.data.seed, question_id,
                           Limits(pts.code_time_limit_s, pts.code_memory_mb),
                           families=self.families, fmt=self.fmt)
        prompt = chat_prompt(problem_.question, self.tokenizer, self.fmt)
        if len(prompt) + pts.max_new_tokens > self.model.cfg.max_positions:
            return records.question_record(question_id, None, seconds=0.0,
                                           skipped="too_long"), [], []
        outcomes = functools.partial(response_outcomes, problem_=problem_,
                                     tokenizer=self.tokenizer, stop_ids=self.stop_ids,
                                     workers=pts.verifier_workers)
        search = search_with(QuestionRollouts(self.model, prompt, question_id, outcomes), pts)
        pairs = [records.pair_record(question_id, prompt, pair, self.tokenizer)
                 for pair in search.pairs]
        responses = records.response_pair_records(
            question_id, self.fmt.messages(problem_.question) if self.fmt else problem_.question,
            search, self.tokenizer, self.stop_ids,
            pts.response_pairs) if search.kept else []
        summary = records.question_record(question_id, search, response_pairs=len(responses),
                                          seconds=time.perf_counter() - start)
        return summary, pairs, responses


def check(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
    """The pts.* keys (and what the job needs of the shared ones), once at start-up."""
    p = config.pts
    require(p.task in TASKS, "pts.task", p.task, f"choose one of {TASKS}.")
    check_families(p.families, "pts.families")
    require(not p.families or p.task == "synthetic", "pts.families", p.families,
            "only task 'synthetic' draws from exercise families; remove the key.")
    require(p.split in SPLIT_RULES, "pts.split", p.split, f"choose one of {SPLIT_RULES}.")
    for key in ("first_question", "response_pairs", "top_k", "rollouts_per_round"):
        require(isinstance(p[key], int) and p[key] >= 0, f"pts.{key}", p[key],
                "must be an integer >= 0.")
    for key in ("questions", "responses_per_question", "rollouts", "max_new_tokens",
                "batch_rows", "verifier_workers", "code_memory_mb"):
        require(isinstance(p[key], int) and p[key] > 0, f"pts.{key}", p[key],
                "must be a positive integer.")
    require(p.first_question + p.questions <= 2**32, "pts.first_question/questions",
            (p.first_question, p.questions), "question ids must stay below 2**32.")
    require(0 < p.p_gap <= 1, "pts.p_gap", p.p_gap, "must lie in (0, 1].")
    require(0 <= p.min_success <= p.max_success <= 1, "pts.min_success/max_success",
            (p.min_success, p.max_success), "need 0 <= min_success <= max_success <= 1.")
    require(p.rollouts_per_round <= p.rollouts, "pts.rollouts_per_round",
            p.rollouts_per_round, f"must not exceed pts.rollouts={p.rollouts} (0: no rounds).")
    require(0 < p.confidence < 1, "pts.confidence", p.confidence, "must lie in (0, 1).")
    require(p.max_new_tokens < model_cfg.max_positions, "pts.max_new_tokens",
            p.max_new_tokens, f"must leave room for the question within model.max_positions="
            f"{model_cfg.max_positions}.")
    require(p.temperature > 0 and 0 < p.top_p <= 1, "pts.temperature/top_p",
            (p.temperature, p.top_p), "rollouts sample: temperature > 0 and top_p in (0, 1].")
    require(p.code_time_limit_s > 0, "pts.code_time_limit_s", p.code_time_limit_s,
            "must be positive.")
    initial_params.require_whole_trained_model(config, "Pivotal Token Search")



def load_rollout_model(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                       tokenizer: Phi4Tokenizer):
    """The starting checkpoint's parameters on this process's devices, and the mesh; the
    model is planned as training plans it (`train.state.plan_model`)."""
    mesh = make_mesh({axis: config.mesh[axis] for axis in MESH_AXES}, jax.local_devices())
    pts = config.pts
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if pts.batch_rows % batch_devices:
        raise ConfigError(f"pts.batch_rows={pts.batch_rows} must be a multiple of the "
                          f"{batch_devices} batch-sharded devices (mesh data*fsdp).")
    # the longest sequence it decodes: a question and its response fill at most max_positions
    model_cfg = resolve_attention(model_cfg, model_cfg.max_positions)
    announce_model(config, model_cfg)
    rules = tuple(tuple(rule) for rule in config.mesh.rules)
    graphdef, target = abstract_model(config, model_cfg, mesh, rules)
    source = initial_params.locate(config.init_from)
    initial_params.check(source, target, model_cfg)
    logging.info("pts_search samples %s checkpoint %s.", source.kind, source.path)
    params = initial_params.load(source, target, model_cfg)
    sampling = decode.SamplingParams(
        max_new_tokens=pts.max_new_tokens, temperature=pts.temperature, top_k=pts.top_k,
        top_p=pts.top_p, stop_ids=(tokenizer.end_of_turn_id, tokenizer.eot_id),
        pad_id=tokenizer.pad_id, draw="inverse_cdf")
    row_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch",), rules))
    model = RolloutModel(params, graphdef, model_cfg, sampling, config.seed, pts.batch_rows,
                         row_sharding if batch_devices > 1 else None, batch_devices)
    return model, mesh, rules


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Searches this process's questions into `<workdir>/pts/`; returns the run's totals."""
    model_cfg = validate_config(config)
    check(config, model_cfg)
    tokenizer = load_tokenizer(tokenizer_for_vocab(model_cfg.vocab_size))
    model, mesh, rules = load_rollout_model(config, model_cfg, tokenizer)
    index, count = jax.process_index(), jax.process_count()
    shard = ShardFiles(Path(workdir) / "pts", index, count)
    ids = question_ids(config.pts, index, count)
    if shard.finished:
        logging.info("pts_search resumes: %d of this process's %d questions are done.",
                     len(shard.finished), len(ids))
    progress = Progress(len(ids), shard.finished.values(), bar=config.log.progress_bar,
                        every=config.log.every_steps)
    try:
        with jax.set_mesh(mesh), logical_rules(rules):
            search_questions(ids, _ModelSearch(config, model, tokenizer), shard, progress)
    finally:
        progress.close()
        shard.close()
    logging.info("pts_search done on process %d: %s", index, progress.line())
    return [{**progress.totals, "rollouts_per_s": progress.rollouts_per_second()}]

