"""Pretraining pipeline throughput (tokens/s) against raw tiktoken encoding of the same documents.

The pipeline mixes synthetic exercises (0.6) and standard-library Python (0.4) by tokens into
rows of 1024. The baselines take the documents a timed pipeline run reads (each source's own
read order, up to its share of the tokens) and, on the same cores, (a) encode them, ready-made,
with tiktoken alone, (b) make them (generate exercises, read files) and encode them in one
plain loop. Pipeline / (a) is the quoted ratio; pipeline / (b) isolates what grain's sharding,
shuffling, packing, mixing, batching and prefetching add to the work that cannot be skipped.

Run from the repository root:
  python benchmarks/data_pipeline.py --tokens 2000000 --write benchmarks/RESULTS_data.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import grain
import tiktoken

from phi4_jax.data import pipeline
from phi4_jax.data.tokenizer import load_tokenizer

SEQ_LEN = 1024
BATCH_SIZE = 8
WARMUP_BATCHES = 2


def bench_config(read_threads: int) -> dict:
    """The benchmark's data config: synthetic + stdlib code by tokens, the run's usual holdout."""
    return dict(
        seed=0,
        sources={"synthetic": {"kind": "synthetic"}, "code": {"kind": "python_stdlib"}},
        mix={"synthetic": 0.6, "code": 0.4},
        eval_holdout=0.01,
        read_threads=read_threads,
        prefetch=4,
    )


def pipeline_rate(cfg: dict, tokens: int) -> tuple[int, float]:
    """(tokens, seconds) for the pipeline to yield `tokens` tokens of batches after a warm-up."""
    iterator = pipeline.make_train_iterator(cfg, seq_len=SEQ_LEN, batch_size=BATCH_SIZE)
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    num_batches = max(1, tokens // (SEQ_LEN * BATCH_SIZE))
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return num_batches * SEQ_LEN * BATCH_SIZE, seconds


def document_counts(cfg: dict, tokens: int) -> dict[str, tuple[int, int]]:
    """Per source, the [first, last) positions in its read order of the documents a timed run reads."""
    tokenizer = load_tokenizer("phi4")
    warmup = WARMUP_BATCHES * SEQ_LEN * BATCH_SIZE
    counts = {}
    for name, weight in cfg["mix"].items():
        ordered = pipeline.shard_documents(name, cfg, split="train", process_index=0, process_count=1)
        read, index, first = 0, 0, None
        while read < weight * (warmup + tokens):
            if first is None and read >= weight * warmup:
                first = index
            read += len(tokenizer.encode(ordered[index])) + 1
            index += 1
        counts[name] = (first if first is not None else index, index)
    return counts


def documents_and_encoding_rate(
    cfg: dict, counts: dict[str, tuple[int, int]], encoding: tiktoken.Encoding
) -> tuple[list[str], int, float]:
    """(documents, tokens, seconds) for one thread to make the documents (generate, read) and encode them."""
    documents, num_tokens = [], 0
    start = time.perf_counter()
    for name, (first, last) in counts.items():
        ordered = pipeline.shard_documents(name, cfg, split="train", process_index=0, process_count=1)
        for index in range(first, last):
            documents.append(ordered[index])
            num_tokens += len(encoding.encode_ordinary(documents[-1])) + 1
    return documents, num_tokens, time.perf_counter() - start


def tiktoken_rate(encoding: tiktoken.Encoding, documents: list[str], num_threads: int) -> tuple[int, float]:
    """(tokens, seconds) for tiktoken to encode ready `documents` on `num_threads` threads (1: a plain loop)."""
    start = time.perf_counter()
    if num_threads == 1:
        encoded = [encoding.encode_ordinary(text) for text in documents]
    else:
        encoded = encoding.encode_ordinary_batch(documents, num_threads=num_threads)
    seconds = time.perf_counter() - start
    return sum(len(ids) + 1 for ids in encoded), seconds


def machine() -> str:
    """CPU model and count, OS, Python and library versions."""
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return (
        f"{model}, {os.cpu_count()} cores visible; {platform.platform()}; "
        f"Python {platform.python_version()}, "
        f"grain {grain.__version__}, tiktoken {tiktoken.__version__}"
    )


def run(tokens: int) -> str:
    """Runs the measurements and returns them as a Markdown table."""
    cores = os.cpu_count() or 1
    encoding = load_tokenizer("phi4").encoding
    counts = document_counts(bench_config(0), tokens)
    documents, made_tokens, made_seconds = documents_and_encoding_rate(bench_config(0), counts, encoding)
    rows = [(f"raw tiktoken on ready documents, {t} thread(s)", *tiktoken_rate(encoding, documents, t))
            for t in sorted({1, cores})]
    rows.append(("make documents + raw tiktoken, 1 thread", made_tokens, made_seconds))
    for read_threads, prefetch in ((0, 0), (1, 4), (cores, 4)):
        cfg = {**bench_config(read_threads), "prefetch": prefetch}
        label = f"pipeline, read_threads={read_threads} per source, prefetch={prefetch}"
        rows.append((label, *pipeline_rate(cfg, tokens)))
    raw = max(n / s for label, n, s in rows if label.startswith("raw"))
    made = made_tokens / made_seconds
    lines = [
        "| run | tokens | seconds | tokens/s | / raw tiktoken | / make + tiktoken |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, n, s in rows:
        lines.append(f"| {label} | {n:,} | {s:.2f} | {n / s:,.0f} | {n / s / raw:.2f} | {n / s / made:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens to time per run")
    parser.add_argument("--write", default="", help="a Markdown file to write the results to")
    args = parser.parse_args()
    table = run(args.tokens)
    report = "\n".join([
        "# Data pipeline throughput",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- mix: synthetic 0.6 + python_stdlib 0.4 by tokens, seq_len {SEQ_LEN}, batch {BATCH_SIZE}, "
        f"after {WARMUP_BATCHES} warm-up batches",
        "",
        table,
        "",
    ])
    print(report)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(report)


if __name__ == "__main__":
    main()
