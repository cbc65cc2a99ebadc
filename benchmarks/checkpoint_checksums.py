r"""What the checkpoint checksums cost: the CRC-32 of every file, on save and on restore,
against the save and the restore themselves.

For each size of `configs/pretrain.py` a fresh train state (parameters and AdamW moments, in
their shards) is saved by the run's own `Checkpointer` (asynchronous, waited for), then
restored onto the same shardings, `--repeats` times; the best time of each is kept. Apart,
on the committed folder: the checksums as the commit hook computes them (every file, files
in the page cache as right after writing) and the verification a run does before trusting
the step (`damage(verify=True)` less the cheap checks). The ratios are what a save and a
restore take longer with checksums than without. The hook runs in orbax's background
thread, so an asynchronous save hides it from the step time; the ratio is the worst case.

Run from the repository root (CPU, ~2 minutes; the numbers in RESULTS_checkpoint.md):
  JAX_PLATFORMS=cpu python benchmarks/checkpoint_checksums.py --sizes tiny,125m \
      --write benchmarks/RESULTS_checkpoint.md
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grain
import jax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phi4_jax import config_base  # pylint: disable=wrong-import-position
from phi4_jax.train import checkpoint, state as state_lib  # pylint: disable=wrong-import-position

_SIZES = flags.DEFINE_list("sizes", ["tiny", "125m"], "Sizes of configs/pretrain.py.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves and restores per size; the best is kept.")
_WRITE = flags.DEFINE_string("write", "", "Append the table to this Markdown file.")


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(size: str, repeats: int) -> dict[str, float]:
    """Seconds of each operation and the checkpoint's bytes for one model size."""
    config = config_base.load_config("configs/pretrain.py", size)
    config.train.seq_len, config.train.global_batch = 128, 1
    run = state_lib.build_run(config, jax.devices()[:1])
    train_state = state_lib.init_state(run)
    root = Path(tempfile.mkdtemp(prefix="phi4_checksum_bench_"))
    try:
        saver = checkpoint.Checkpointer(str(root / "checkpoints"), keep=1, every_steps=1)
        steps = iter(range(1, 10 ** 6))

        def save():
            data = iter(grain.MapDataset.range(4).to_iter_dataset())
            saver.save(next(steps), train_state, data, {"seed": 0}, force=True)
            saver.wait()

        save_s = _best(save, repeats)
        step_dir = root / "checkpoints" / str(saver.latest_step())
        files = [p for item in checkpoint.ITEMS for p in (step_dir / item).rglob("*") if p.is_file()]
        checksum_s = _best(lambda: [checkpoint.crc32(p) for p in files], repeats)
        verify_s = _best(lambda: checkpoint._checksum_problem(step_dir), repeats)  # pylint: disable=protected-access
        data = iter(grain.MapDataset.range(4).to_iter_dataset())
        restore_s = _best(lambda: jax.block_until_ready(
            saver.restore(saver.latest_step(), run.abstract_state, data)[0]), repeats)
        saver.close()
        return {"bytes": sum(p.stat().st_size for p in files), "save_s": save_s,
                "checksum_s": checksum_s, "restore_s": restore_s, "verify_s": verify_s}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| size | checkpoint MB | save s | checksums s | save + | restore s | verify s | "
             "restore + |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size, r in results.items():
        lines.append(
            f"| {size} | {r['bytes'] / 1e6:.1f} | {r['save_s']:.3f} | {r['checksum_s']:.3f} | "
            f"{r['checksum_s'] / r['save_s']:.1%} | {r['restore_s']:.3f} | {r['verify_s']:.3f} | "
            f"{r['verify_s'] / r['restore_s']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    results = {size: measure(size, _REPEATS.value) for size in _SIZES.value}
    text = table(results)
    print(text)
    if _WRITE.value:
        header = (f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                  f"{jax.devices()[0].platform}\n\n`{' '.join(['python', *sys.argv])}`\n\n")
        with open(_WRITE.value, "a", encoding="utf-8") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    app.run(main)
