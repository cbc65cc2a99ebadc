"""Test-wide setup: eight fake CPU devices, so sharded code runs on a laptop; and the runs that
several test files start from, made once per session (`made_once`).

No persistent compilation cache: on XLA:CPU (jax 0.10.2) a sharded train step loaded warm from
the cache deadlocked in its first all-gather ("Expected 8 threads to join the rendezvous, but
only 1 of them arrived"), while the same step compiled fresh runs; each process compiles."""

import fcntl
import importlib.metadata
import os
import shutil

import pytest

# Compile-time settings for the suite's many small programs: XLA:CPU's fusion emitters and
# LLVM's optimizations take most of a toy train step's compile (6.2 s -> 0.6 s without them,
# measured on one core with jaxlib 0.10.2) and buy nothing at these sizes. Results stay
# within every test's tolerance. Set only for the jaxlib they were measured with, as
# XLA refuses a flag it does not know; subprocesses inherit them.
FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                      "--xla_backend_optimization_level=0")
MEASURED_JAXLIB = ("0.10.",)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count=8"
if importlib.metadata.version("jaxlib").startswith(MEASURED_JAXLIB):
    flags = " ".join([flags, *(f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in flags)])
os.environ["XLA_FLAGS"] = flags.strip()


@pytest.fixture(scope="session")
def made_once(tmp_path_factory):
    """`made_once(name, make)`: a folder that `make(folder)` fills once per session; the first
    pytest-xdist worker to ask makes it, the others wait for it and reuse it. Tests must not
    write into it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one session's

    def made(name, make):
        folder = shared / name
        with open(shared / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (shared / f"{name}.done").exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
                folder.mkdir()
                make(folder)
                (shared / f"{name}.done").touch()
        return folder

    return made


@pytest.fixture(scope="session")
def pretrained_toy(made_once):
    """The workdir of a one-step toy pretraining run (a checkpoint at step 1) that mid-training,
    post-training and LoRA tests start from."""
    from phi4_jax import config_base, stages  # after the device flags above

    def pretrain(workdir):
        c = config_base.load_config("configs/pretrain.py", "toy")
        c.train.update(steps=1, seq_len=64, global_batch=8, warmup_steps=1)
        c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
        c.eval.update(every_steps=1, batches=1)
        stages.run(c, str(workdir))

    return made_once("pretrained_toy", pretrain)
