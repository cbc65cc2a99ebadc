"""phi4_jax as an lm-evaluation-harness model (`phi4_jax`): the harness's tasks scored and
decoded by phi4_jax's own model, chunked scorer and KV-cache sampler on the config's mesh.

    python -m phi4_jax.evaluate --config=configs/sft.py:toy --config.init_from=DIR --tasks=...

The requests are read as lm-eval's Hugging Face backend reads them, so a checkpoint and its
export (`python -m phi4_jax.export`) score alike: the same context truncation, rolling
windows (`lm_eval.utils.get_rolling_token_windows`), `<|endoftext|>` before an empty
context, special-token strings in the text read as those tokens (a chat-templated prompt
arrives as text), special tokens left out of generated text, and generations cut at the
first stop string. Generation is greedy and ends, row by row, at the end of a turn or a
document, at `max_gen_toks`, or at a token whose bytes hold a stop string; a stop string
that spans tokens is cut from the text afterwards.

Requests run in batches of a few shapes (`evals.buckets`); `batch_size` bounds the rows and
`batch_tokens` the padded tokens of a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, \
    postprocess_generated_text

from phi4_jax import config_base
from phi4_jax.data.tokenizer import Phi4Tokenizer, load_tokenizer, tokenizer_for_vocab
from phi4_jax.errors import Phi4Error
from phi4_jax.evals import buckets
from phi4_jax.model.config import ModelConfig
from phi4_jax.parallel.sharding import MESH_AXES, logical_rules, logical_to_spec, make_mesh
from phi4_jax.sampling import decode
from phi4_jax.sampling.scoring import target_log_probs_and_greedy
from phi4_jax.train import initial_params
from phi4_jax.train.state import abstract_model, announce_model, resolve_attention

BATCH_SIZE = 32  # most requests run at once
BATCH_TOKENS = 8192  # most padded tokens in a batch: bounds the activations and chunk logits
MAX_GEN_TOKS = 256  # lm-eval's default generation budget, as its Hugging Face backend's


class HarnessError(Phi4Error, ValueError):
    """A request the backend cannot serve as asked; the message names the setting and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """A checked evaluation model: everything `load` needs, nothing allocated yet."""

    cfg: ModelConfig
    mesh: Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    target: Any  # parameter shapes, dtypes and shardings
    source: initial_params.InitialCheckpoint
    chunk_tokens: int


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """A checkpoint's parameters on the mesh, with what scoring and decoding them needs."""

    plan: ModelPlan
    params: Any

    @property
    def tokenizer(self) -> Phi4Tokenizer:
        return load_tokenizer(tokenizer_for_vocab(self.plan.cfg.vocab_size))

    @property
    def batch_devices(self) -> int:
        return self.plan.mesh.shape["data"] * self.plan.mesh.shape["fsdp"]

    @property
    def row_sharding(self) -> NamedSharding:
        return NamedSharding(self.plan.mesh, logical_to_spec(("batch",), self.plan.rules))


def plan_model(config: ml_collections.ConfigDict) -> ModelPlan:
    """Checks the config and `init_from` on metadata alone: a missing or damaged checkpoint,
    or one of another size than `model.size`, is refused before anything is compiled."""
    model_cfg = config_base.validate_config(config)
    initial_params.require_whole_trained_model(config, "evaluation")
    source = initial_params.locate(config.init_from)
    mesh = make_mesh({axis: config.mesh[axis] for axis in MESH_AXES}, jax.local_devices())
    model_cfg = resolve_attention(model_cfg, model_cfg.max_positions)
    announce_model(config, model_cfg)
    rules = tuple(tuple(rule) for rule in config.mesh.rules)
    graphdef, target = abstract_model(config, model_cfg, mesh, rules)
    initial_params.check(source, target, model_cfg)
    return ModelPlan(model_cfg, mesh, rules, graphdef, target, source,
                     config.train.loss_chunk_tokens)


def load_model(plan: ModelPlan) -> EvalModel:
    logging.info("Evaluating %s checkpoint %s.", plan.source.kind, plan.source.path)
    return EvalModel(plan, initial_params.load(plan.source, plan.target, plan.cfg))


@functools.cache
def _token_bytes(tokenizer_name: str) -> tuple[bytes, ...]:
    """Every token's bytes, by id; empty for the special tokens, which are never text."""
    tokenizer = load_tokenizer(tokenizer_name)
    specials = set(tokenizer.special_tokens.values())
    return tuple(b"" if i in specials else tokenizer.encoding.decode_single_token_bytes(i)
                 for i in range(tokenizer.encoding.n_vocab))


@functools.lru_cache(maxsize=64)
def _stop_ids(tokenizer_name: str, stops: tuple[str, ...]) -> tuple[int, ...]:
    """`stop_token_ids` of a tokenizer, once per set of stops (a scan of its vocabulary)."""
    return stop_token_ids(_token_bytes(tokenizer_name), stops)


def stop_token_ids(token_bytes: Sequence[bytes], stops: Sequence[str]) -> tuple[int, ...]:
    """Ids of the tokens whose bytes hold a whole stop string: emitting one ends the text at
    that stop, so decoding may end there. (A stop spread over tokens is cut afterwards.)"""
    needles = [stop.encode("utf-8") for stop in stops if stop]
    return tuple(i for i, token in enumerate(token_bytes) if any(n in token for n in needles))


def generated_text(tokenizer: Phi4Tokenizer, ids: Sequence[int], stops: Sequence[str]) -> str:
    """A generation's text as lm-eval's Hugging Face backend returns it: special tokens left
    out, cut before the first stop string."""
    specials = set(tokenizer.special_tokens.values())
    text = tokenizer.decode([i for i in ids if i not in specials])
    return postprocess_generated_text(text, list(stops), None)


def chat_text(tokenizer: Phi4Tokenizer, messages: Sequence[dict], add_generation_prompt: bool
              ) -> str:
    """A conversation in the tokenizer's chat format (`Phi4Tokenizer.encode_chat`) as text.
    Without a generation prompt the last message stays open for the model to continue (an
    assistant prefill), as transformers' `continue_final_message` leaves it."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt).ids
    if not add_generation_prompt:
        ids = ids[:len(ids) - 1 - tokenizer.chat.eos_after_chat]  # the turn end, a closing eos
    return tokenizer.decode(ids)


@register_model("phi4_jax")
class Phi4LM(TemplateLM):
    """lm-eval's `LM` over a loaded `EvalModel` (module docstring)."""

    def __init__(self, model: EvalModel, batch_size: int = BATCH_SIZE,
                 batch_tokens: int = BATCH_TOKENS, max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer_ = model, model.tokenizer
        self.batch_size, self.batch_tokens = int(batch_size), int(batch_tokens)
        self.max_length = max_length or model.plan.cfg.max_positions
        plan = model.plan
        self._score = jax.jit(lambda params, batch: target_log_probs_and_greedy(
            params, plan.graphdef, batch, chunk_tokens=plan.chunk_tokens))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None
                            ) -> "Phi4LM":
        """`simple_evaluate(model="phi4_jax", model_args={"config": "configs/sft.py:toy",
        "init_from": DIR})`: the config file (with its argument) and checkpoint to score."""
        args = {**{k: v for k, v in (additional_config or {}).items()
                   if k in ("batch_size",) and v is not None}, **arg_dict}
        config = config_base.load_config(args.pop("config"))
        config.init_from = args.pop("init_from", config.init_from)
        return cls(load_model(plan_model(config)), **args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> "Phi4LM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.end_of_turn_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.eot_id

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return f"phi4_jax_{self.tokenizer_.name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The chat format as a Jinja template, which lm-eval records with the results."""
        if not chat_template:
            return None
        from phi4_jax.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top  # [hf]
        return hf_tokenizer.chat_template(self.tokenizer_.chat)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return chat_text(self.tokenizer_, chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                   ) -> list[int]:
        del add_special_tokens, kwargs  # phi4_jax's tokenizers add no bos or eos
        return self.tokenizer_.encoding.encode(string, allowed_special="all")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation)
        per (strings, context ids, continuation ids); the context is cut from the left to
        fit the model's context."""
        del disable_tqdm, kwargs
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        results = []
        for (strings, _, _), (log_probs, greedy) in zip(requests, self._scored(rows)):
            answer = (float(np.sum(log_probs, dtype=np.float64)), bool(np.all(greedy)))
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
            results.append(answer)
        return results

    def _scored(self, rows: list[tuple[list[int], list[int], int]]):
        """Per row (inputs, targets, n): log p and greedy flags of its last n targets."""
        out: list = [None] * len(rows)
        for indices in buckets.batches([len(r[0]) for r in rows], max_rows=self.batch_size,
                                       max_tokens=self.batch_tokens, largest=self.max_length):
            width = buckets.bucket(len(rows[indices[0]][0]), self.max_length)
            batch = _right_padded([rows[i] for i in indices], width, self._padded(len(indices)),
                                  self.tokenizer_.pad_id)
            log_probs, greedy = jax.device_get(self._run(self._score, self.model.params, batch))
            for row, i in enumerate(indices):
                length, n = len(rows[i][0]), rows[i][2]
                out[i] = (log_probs[row, length - n:length], greedy[row, length - n:length])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per request over lm-eval's disjoint rolling windows of the context."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, grouped by their generation settings."""
        del disable_tqdm
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str),
                              []).append(index)
        results: list = [None] * len(requests)
        for indices in groups.values():
            texts = self._generate([requests[i].args[0] for i in indices],
                                   requests[indices[0]].args[1])
            for i, text in zip(indices, texts):
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                results[i] = text
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Greedy texts of contexts that share generation settings, in batches of a few
        shapes; a context is cut from the left to leave room for `max_gen_toks`."""
        until, sampling = self._greedy(gen_kwargs)
        room = self.max_length - sampling.max_new_tokens
        prompts = [self.tok_encode(context)[-room:] or [self.prefix_token_id]
                   for context in contexts]
        generate = decode.compiled_generate(self.model.plan.graphdef, self.model.plan.cfg,
                                            sampling)
        texts: list = [None] * len(prompts)
        for indices in buckets.batches([len(p) for p in prompts], max_rows=self.batch_size,
                                       max_tokens=self.batch_tokens, largest=room):
            rows, batch = self._padded(len(indices)), [prompts[i] for i in indices]
            prompt = decode.left_pad(batch + batch[:1] * (rows - len(batch)),
                                     buckets.bucket(len(batch[0]), room), self.tokenizer_.pad_id)
            out = jax.device_get(self._run(generate, self.model.params, prompt,
                                           decode.row_keys(0, range(rows))))
            for row, i in enumerate(indices):
                texts[i] = generated_text(self.tokenizer_, out.tokens[row][out.mask[row] == 1],
                                          until)
        return texts

    def _greedy(self, gen_kwargs: dict) -> tuple[list[str], decode.SamplingParams]:
        """The stop strings (the end of a turn's text added, as lm-eval adds the eos) and the
        greedy sampler of a task's generation settings; HarnessError for sampling."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
            raise HarnessError(f"generation settings {gen_kwargs}: the phi4_jax backend decodes "
                               f"greedily; set do_sample=false / temperature=0 in the task's "
                               f"generation_kwargs.")
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tokenizer_.decode([self.eot_token_id]))
        budget = int(kwargs.pop("max_gen_toks"))
        if budget >= self.max_length:
            raise HarnessError(f"max_gen_toks={budget} leaves no room for the prompt in the "
                               f"model's {self.max_length} positions; lower it.")
        stops = (self.tokenizer_.end_of_turn_id, self.tokenizer_.eot_id,
                 *_stop_ids(self.tokenizer_.name, tuple(until)))
        return until, decode.SamplingParams(max_new_tokens=budget, temperature=0.0,
                                            stop_ids=tuple(sorted(set(stops))),
                                            pad_id=self.tokenizer_.pad_id)

    def _padded(self, count: int) -> int:
        return buckets.padded_rows(count, self.model.batch_devices)

    def _run(self, fn, params, *inputs):
        """`fn(params, *inputs)` on the mesh, the rows split over its batch axes."""
        plan = self.model.plan
        if self.model.batch_devices > 1:
            inputs = jax.device_put(inputs, self.model.row_sharding)
        with jax.set_mesh(plan.mesh), logical_rules(plan.rules):
            return fn(params, *inputs)


def _right_padded(rows: list[tuple[list[int], list[int], int]], width: int, count: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """`inputs`, `targets`, `positions`, `segment_ids` [count, width] of the rows, padded on
    the right (segment 0, which no real token attends to); extra rows repeat the first."""
    rows = rows + rows[:1] * (count - len(rows))
    batch = {"inputs": np.full((count, width), pad_id, np.int32),
             "targets": np.zeros((count, width), np.int32),
             "positions": np.zeros((count, width), np.int32),
             "segment_ids": np.zeros((count, width), np.int32)}
    for r, (inputs, targets, _) in enumerate(rows):
        n = len(inputs)
        batch["inputs"][r, :n], batch["targets"][r, :n] = inputs, targets
        batch["positions"][r, :n], batch["segment_ids"][r, :n] = np.arange(n), 1
    return batch
