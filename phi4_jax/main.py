r"""Runs a phi4_jax stage: `python -m phi4_jax.main --config=configs/<stage>.py[:arg] --workdir=DIR`.

The stage is chosen by the config (`config.stage`). Overrides use ml_collections syntax,
e.g. `--config.data.mix.synthetic=0.5`. `--print_mixture` prints the data-mixture table
(weights, tokens per source over the run, unique tokens, epochs) and exits.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. "
                                          "configs/pretrain.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard.")
_PRINT_MIXTURE = flags.DEFINE_bool("print_mixture", False,
                                   "Print the data-mixture report and exit without training.")


def main(argv: list[str]) -> int:
    del argv
    from phi4_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

    spec = distributed.initialize_distributed()  # before anything touches a JAX backend
    from phi4_jax import stages  # pylint: disable=g-import-not-at-top
    from phi4_jax.data import mixture  # pylint: disable=g-import-not-at-top
    from phi4_jax.errors import Phi4Error  # pylint: disable=g-import-not-at-top

    config = _CONFIG.value
    logging.info("Cluster: %s", spec)
    if _PRINT_MIXTURE.value:
        t = config.train
        print(mixture.mixture_report(config.data, total_tokens=t.steps * t.global_batch * t.seq_len))
        return 0
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required to train (checkpoints and logs go there).")
    try:
        stages.run(config, _WORKDIR.value)
    except Phi4Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
