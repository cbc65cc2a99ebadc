r"""lm-eval throughput: the `phi4_jax` backend against lm-eval's own Hugging Face backend on the
same weights, on one CPU core.

  taskset -c 0 python benchmarks/lm_eval_throughput.py --sizes=tiny,125m --repeats=3 \
      --write=benchmarks/RESULTS_lm_eval.md

For each size, a model of `configs/pretrain.py:<size>` initialized at random is written as
a Hugging Face directory, as `python -m phi4_jax.export` writes one (safetensors through
`interop.hf_checkpoint`, the tokenizer, generation_config.json); `phi4_jax.evals.harness`
reads it through `init_from`, lm-eval's `HFLM` through `from_pretrained` (float32, CPU, torch
on one thread). Both get the same request lists and the same batch size:
  - loglikelihood: contexts of 32-96 words, continuations of 1-4 words: requests/s;
  - generate_until: contexts of 16-48 words, greedy, `max_gen_toks` new tokens unless the end
    of a turn comes first: tokens/s, counting the returned text in the model's tokens.
The first pass of each backend is a warm-up (phi4_jax compiles its few shapes) and is not
timed. Then `--repeats` rounds, each timing phi4_jax and then HF on both workloads, so drifts
in machine load hit both alike; a round gives one ratio phi4_jax / hf per workload, and the
median and range of the ratios are reported beside the absolute rates (context only).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_SIZES = flags.DEFINE_list("sizes", ["tiny", "125m"], "configs/pretrain.py sizes to measure.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per size (after one warm-up).")
_LL_REQUESTS = flags.DEFINE_integer("loglikelihood_requests", 32, "Requests per pass.")
_GEN_REQUESTS = flags.DEFINE_integer("generate_requests", 8, "Requests per pass.")
_MAX_GEN_TOKS = flags.DEFINE_integer("max_gen_toks", 32, "New tokens per generation.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Requests per batch, both backends.")
_WRITE = flags.DEFINE_string("write", "", "Markdown file to append the results to.")
WORDS = ("the of and to in is was for on that with as by at from his her an which this be "
         "are were had have not but all they one two three four five time year new first "
         "people water number house river city world light music table garden letter").split()


def write_hf_model(size: str, folder: Path) -> None:
    """A random model of the size as a Hugging Face directory, as an export writes one."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from phi4_jax import config_base, export  # pylint: disable=g-import-not-at-top
    from phi4_jax.data.tokenizer import load_tokenizer, tokenizer_for_vocab  # pylint: disable=g-import-not-at-top
    from phi4_jax.interop import hf_checkpoint, hf_tokenizer  # pylint: disable=g-import-not-at-top
    from phi4_jax.model.transformer import init_model  # pylint: disable=g-import-not-at-top

    cfg = config_base.validate_config(config_base.load_config("configs/pretrain.py", size))
    tokenizer = load_tokenizer(tokenizer_for_vocab(cfg.vocab_size))
    with jax.default_device(jax.devices("cpu")[0]):
        params = nnx.state(init_model(cfg, 0))
    hf_checkpoint.save_hf_checkpoint(params, cfg, folder, dtype="float32",
                                     token_ids=hf_tokenizer.token_ids(tokenizer))
    hf_tokenizer.save_hf_tokenizer(tokenizer, folder, max_length=cfg.max_positions)
    (folder / export.GENERATION_CONFIG).write_text(
        json.dumps(export.generation_config(tokenizer)))


def requests(seed: int = 0):
    """(loglikelihood, generate_until) request lists, the same for both backends."""
    from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(seed)

    def text(low, high):
        return " ".join(rng.choice(WORDS, int(rng.integers(low, high + 1))))

    scoring = [Instance("loglikelihood", {}, (text(32, 96), " " + text(1, 4)), i)
               for i in range(_LL_REQUESTS.value)]
    kwargs = {"until": [], "max_gen_toks": _MAX_GEN_TOKS.value, "do_sample": False}
    generating = [Instance("generate_until", {}, (text(16, 48), dict(kwargs)), i)
                  for i in range(_GEN_REQUESTS.value)]
    return scoring, generating


def timed(fn, *args) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure(size: str) -> dict:
    """Warm-up, then interleaved rounds; rates and ratios per workload."""
    import torch  # pylint: disable=g-import-not-at-top
    from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top

    from phi4_jax import config_base  # pylint: disable=g-import-not-at-top
    from phi4_jax.data.tokenizer import load_tokenizer, tokenizer_for_vocab  # pylint: disable=g-import-not-at-top
    from phi4_jax.evals import harness  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        write_hf_model(size, folder)
        config = config_base.load_config("configs/pretrain.py", size)
        config.init_from = str(folder)
        backends = {
            "phi4_jax": harness.Phi4LM(harness.load_model(harness.plan_model(config)),
                                       batch_size=_BATCH_SIZE.value),
            "hf": HFLM(pretrained=str(folder), device="cpu", dtype="float32",
                       batch_size=_BATCH_SIZE.value)}
        tokenizer = load_tokenizer(tokenizer_for_vocab(
            backends["phi4_jax"].model.plan.cfg.vocab_size))
        scoring, generating = requests()
        texts = {}
        for name, lm in backends.items():  # warm-up
            lm.loglikelihood(scoring, disable_tqdm=True)
            texts[name] = lm.generate_until(generating, disable_tqdm=True)
        rates = {(name, work): [] for name in backends for work in ("ll", "gen")}
        for _ in range(_REPEATS.value):
            for name, lm in backends.items():
                seconds, _ = timed(lambda: lm.loglikelihood(scoring, disable_tqdm=True))
                rates[name, "ll"].append(len(scoring) / seconds)
                seconds, out = timed(lambda: lm.generate_until(generating, disable_tqdm=True))
                rates[name, "gen"].append(sum(len(tokenizer.encode(t)) for t in out) / seconds)
    return {"rates": rates, "same_generations": texts["phi4_jax"] == texts["hf"]}


def _ratios(rates: dict, work: str) -> list[float]:
    return [a / b for a, b in zip(rates["phi4_jax", work], rates["hf", work])]


def table(results: dict[str, dict]) -> str:
    lines = ["| size | workload | phi4_jax / hf (median, range) | phi4_jax | hf | same greedy text |",
             "|---|---|---|---|---|---|"]
    for size, result in results.items():
        rates = result["rates"]
        for work, unit in (("ll", "requests/s"), ("gen", "tokens/s")):
            ratios = _ratios(rates, work)
            lines.append(
                f"| {size} | {'loglikelihood' if work == 'll' else 'generate_until'} | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{statistics.median(rates['phi4_jax', work]):.1f} {unit} | "
                f"{statistics.median(rates['hf', work]):.1f} {unit} | "
                f"{'yes' if result['same_generations'] else 'no'} |")
    return "\n".join(lines)


def header() -> str:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}"
                         for p in ("jax", "flax", "torch", "transformers", "lm_eval"))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    affinity = len(os.sched_getaffinity(0))
    return (f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {cpu}, {affinity} core(s) available to the process "
            f"({os.cpu_count()} in the machine), Python {platform.python_version()}; "
            f"{versions}.\nCommand: `{' '.join(['python', *sys.argv])}` "
            f"({_LL_REQUESTS.value} loglikelihood and {_GEN_REQUESTS.value} generate_until "
            f"requests per pass, max_gen_toks {_MAX_GEN_TOKS.value}, batch size "
            f"{_BATCH_SIZE.value}, {_REPEATS.value} timed rounds after a warm-up).\n")


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    results = {}
    for size in _SIZES.value:
        results[size] = measure(size)
        print(table({size: results[size]}), flush=True)
    report = header() + "\n" + table(results) + "\n"
    print(report)
    if _WRITE.value:
        with open(_WRITE.value, "a", encoding="utf-8") as out:
            out.write(report + "\n")


if __name__ == "__main__":
    app.run(main)
