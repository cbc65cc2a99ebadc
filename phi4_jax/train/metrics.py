"""Where metrics go: a log line, a progress bar and TensorBoard event files, on process 0."""

from __future__ import annotations

import logging
import os

import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Writes scalars to stdout/log and `<workdir>/tensorboard`; silent on other hosts."""

    def __init__(self, workdir: str, *, enabled: bool, progress: bool, total_steps: int):
        self.is_lead = jax.process_index() == 0
        self.tensorboard = (SummaryWriter(os.path.join(workdir, "tensorboard"))
                            if enabled and self.is_lead else None)
        self.bar = (tqdm.tqdm(total=total_steps, unit="step", dynamic_ncols=True)
                    if progress and self.is_lead and jax.process_count() == 1 else None)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_lead:
            return
        line = " ".join(f"{k}={_format(v)}" for k, v in sorted(scalars.items()))
        if self.bar is not None:
            self.bar.write(f"step {step}: {line}")
        logging.info("step %d: %s", step, line)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
