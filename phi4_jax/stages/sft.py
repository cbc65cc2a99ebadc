"""Supervised fine-tuning on ChatML conversations (Phi-4 report section 4.1), and on
think-then-answer reasoning traces (Phi-4-reasoning, `sft.template='reasoning'`).

Pretraining's loss and engine with other rows: each conversation is encoded, masked to its
assistant turns (content and `<|im_end|>`) and packed whole into rows
(`phi4_jax.data.chat`), so conversations never attend to each other.
"""

from __future__ import annotations

import functools

import grain

from phi4_jax.config_base import ConfigError
from phi4_jax.data import bad_records, chat, pipeline, reasoning
from phi4_jax.stages import teachability
from phi4_jax.stages.grpo import problem_of, sampling_params
from phi4_jax.stages.pretrain import Pretrain
from phi4_jax.train.state import Run


class SFT(Pretrain):
    name = "sft"

    def __init__(self):
        self.counts = chat.Counts()
        self.teachable: dict[str, float] = {}

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.reasoning.teachable_pool and reasoning.format_for(config) is None:
            raise ConfigError(f"reasoning.teachable_pool={config.reasoning.teachable_pool} needs "
                              f"--config.sft.template=reasoning: the filter samples "
                              f"think-then-answer responses (or set it to 0).")

    def frozen(self, run: Run, initial_params, workdir: str) -> None:
        """Nothing frozen; the teachability filter, when on, picks the problems to train on."""
        self.subsets, self.teachable = teachability.kept_subsets(
            run, problem_of, run.tokenizer, reasoning.format_for(run.config),
            sampling_params(run.config, run.tokenizer), initial_params, workdir)
        return None

    def rows_fn(self, run: Run, split: str) -> pipeline.RowsFn:
        return functools.partial(_conversation_rows, tokenizer=run.tokenizer,
                                 seq_len=run.config.train.seq_len,
                                 truncation=run.config.sft.truncation, counts=self.counts,
                                 reasoning_format=reasoning.format_for(run.config))

    def evaluate(self, run: Run, params, frozen) -> dict[str, float]:
        return {**super().evaluate(run, params, frozen), **self.counts.as_metrics("sft"),
                **self.teachable}


def _conversation_rows(name, records: grain.MapDataset, cfg, *, tokenizer, seq_len: int,
                       truncation: str, counts: chat.Counts, reasoning_format
                       ) -> grain.IterDataset:
    example = functools.partial(chat.sft_example, tokenizer=tokenizer,
                                seq_len=seq_len, truncation=truncation, counts=counts,
                                reasoning_format=reasoning_format)
    examples = bad_records.convert(name, records, example, cfg["sources"][name])
    examples = examples.filter(lambda e: e is not None)
    read_options = grain.ReadOptions(num_threads=cfg["read_threads"],
                                     prefetch_buffer_size=4 * max(cfg["read_threads"], 1))
    return chat.pack_examples(examples.to_iter_dataset(read_options), seq_len,
                              cfg["max_segments_per_row"])
