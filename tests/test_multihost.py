"""`python -m phi4_jax.main` as two CPU processes of four devices each (one 8-device mesh):
training, checkpoints with one iterator state per process, preemption and resume, and a
global batch assembled from both processes' own data shards.

Each run takes ~20 s of two busy cores; the straight run is shared by the module's tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from phi4_jax import config_base
from phi4_jax.stages import evaluation
from phi4_jax.train import loop
from phi4_jax.train import state as state_lib
from phi4_jax.data import pipeline
from phi4_jax.parallel.sharding import logical_rules

REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4
GLOBAL_DEVICES = NUM_PROCESSES * DEVICES_PER_PROCESS
STEPS, CHECKPOINT_EVERY = 6, 3
OVERRIDES = {"train.steps": STEPS, "train.seq_len": 64, "train.warmup_steps": 2,
             "log.every_steps": 1, "log.progress_bar": False, "log.tensorboard": True,
             "checkpoint.every_steps": CHECKPOINT_EVERY, "eval.every_steps": STEPS,
             "eval.batches": 1}
JOB_TIMEOUT_S = 240
_SCHEDULER_PREFIXES = ("SLURM_", "TPU_", "MEGASCALE_", "PHI4_", "JAX_COORDINATOR", "JAX_LOCAL",
                       "JOB_COMPLETION_INDEX", "CUDA_VISIBLE_DEVICES")
_LOG_LINE = re.compile(r"\] step (\d+): (.*)$", re.MULTILINE)


# ---------------------------------------------------------------- running the job

@dataclasses.dataclass
class Job:
    """The two `main` processes of one run; each writes its output to a file (no pipe to fill)."""

    workdir: Path
    processes: list[subprocess.Popen]
    logs: list[Path]

    def output(self, process_id: int) -> str:
        return self.logs[process_id].read_text(errors="replace")

    def describe(self) -> str:
        """The tail of each process's output, for failure messages."""
        return "\n".join(f"--- process {i} (exit {p.poll()}):\n{self.output(i)[-4000:]}"
                         for i, p in enumerate(self.processes))

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def wait(self) -> None:
        """Both processes exit 0 within the timeout, or the test fails with their output."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        try:
            for process in self.processes:
                process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s:\n{self.describe()}")
        assert [p.returncode for p in self.processes] == [0] * NUM_PROCESSES, self.describe()

    def wait_for_line(self, process_id: int, text: str) -> None:
        """Polls `process_id`'s output until it contains `text`."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while text not in self.output(process_id):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                self.kill()
                pytest.fail(f"no {text!r} from process {process_id}:\n{self.describe()}")
            time.sleep(0.05)


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_job(workdir: Path) -> Job:
    """Starts process 0 and 1 of `main` on the toy config with `OVERRIDES`, sharing `workdir`."""
    try:
        port = _free_local_port()
    except OSError as error:
        pytest.skip(f"cannot bind a TCP port on 127.0.0.1 for the coordinator: {error}")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_SCHEDULER_PREFIXES) and "_proxy" not in k.lower()}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=re.sub(r"device_count=\d+", f"device_count={DEVICES_PER_PROCESS}",
                         os.environ["XLA_FLAGS"]),  # conftest's, at 4 devices
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PHI4_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               PHI4_NUM_PROCESSES=str(NUM_PROCESSES))
    command = [sys.executable, "-m", "phi4_jax.main", "--config=configs/pretrain.py:toy",
               f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
    run_index = len(list(workdir.glob("process_0.run*.log")))
    logs = [workdir / f"process_{i}.run{run_index}.log" for i in range(NUM_PROCESSES)]
    processes = []
    for process_id, log in enumerate(logs):
        with log.open("w") as sink:
            processes.append(subprocess.Popen(
                command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                env={**env, "PHI4_PROCESS_ID": str(process_id)}))
    return Job(workdir, processes, logs)


def run_job(workdir: Path) -> Job:
    job = start_job(workdir)
    job.wait()
    return job


# ---------------------------------------------------------------- reading what it wrote

def _records(path: Path):
    """The payloads of a TFRecord file (TensorBoard's event format), CRCs checked."""
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        payload = data[offset + 12:offset + 12 + length]
        header_crc, payload_crc = (struct.unpack_from("<I", data, at)[0]
                                   for at in (offset + 8, offset + 12 + length))
        assert (header_crc, payload_crc) == (masked_crc32c(header), masked_crc32c(payload)), path
        yield payload
        offset += 16 + length


def tensorboard_runs(workdir: Path) -> list[dict[str, dict[int, float]]]:
    """Per event file (one per invocation, oldest first): tag -> step -> float32 value."""
    runs = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        scalars: dict[str, dict[int, float]] = {}
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        runs.append(scalars)
    return runs


def logged_metrics(output: str) -> dict[int, dict[str, float]]:
    """step -> the metrics of process 0's 'step N: k=v ...' log lines."""
    steps: dict[int, dict[str, float]] = {}
    for step, pairs in _LOG_LINE.findall(output):
        steps.setdefault(int(step), {}).update(
            (key, float(value)) for key, value in (pair.split("=") for pair in pairs.split()))
    return steps


def iterator_states(workdir: Path, step: int) -> list[dict]:
    """The grain iterator state each process saved with checkpoint `step`."""
    data = workdir / "checkpoints" / str(step) / "data"
    return [json.loads((data / f"process_{i}-of-{NUM_PROCESSES}.json").read_text())
            for i in range(NUM_PROCESSES)]


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def toy_config() -> ml_collections.ConfigDict:
    """The job's config, built in this process from the same file and `OVERRIDES`."""
    config = config_base.load_config("configs/pretrain.py", "toy")
    for dotted, value in OVERRIDES.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def straight(made_once) -> Job:
    """One uninterrupted 6-step run, shared by the tests below (and the xdist workers)."""
    workdir = made_once("multihost_straight", run_job)
    return Job(workdir, [], sorted(workdir.glob("process_*.run0.log")))


# ---------------------------------------------------------------- tests

@pytest.mark.slow
def test_two_processes_train_and_checkpoint_together(straight):
    logged = logged_metrics(straight.output(0))
    assert sorted(s for s, m in logged.items() if "loss" in m) == list(range(1, STEPS + 1))
    assert all(math.isfinite(logged[s]["loss"]) for s in range(1, STEPS + 1)), logged
    assert math.isfinite(logged[STEPS]["eval_loss"])
    assert logged_metrics(straight.output(1)) == {}, "only process 0 writes metrics"
    scalars, = tensorboard_runs(straight.workdir)
    for step in range(1, STEPS + 1):  # throughput is spread over the global mesh
        per_device = scalars["tokens_per_s_per_device"][step]
        assert scalars["tokens_per_s"][step] == pytest.approx(GLOBAL_DEVICES * per_device,
                                                              rel=1e-5)
    steps = checkpoint_steps(straight.workdir)
    assert {CHECKPOINT_EVERY, STEPS} <= set(steps), steps
    for step in steps:
        state_files = sorted(p.name for p in (straight.workdir / f"checkpoints/{step}/data")
                             .glob("process_*.json"))
        assert state_files == ["process_0-of-2.json", "process_1-of-2.json"], (step, state_files)


@pytest.mark.slow
def test_preempted_and_resumed_run_equals_the_straight_run(straight, tmp_path):
    """SIGTERM reaches process 0 alone, so only JAX's preemption service can stop process 1:
    both must save the same step and exit 0, whenever the signal lands (a per-host flag hangs
    here, deterministically). The resumed run must then repeat the straight run's numbers."""
    first = start_job(tmp_path)
    first.wait_for_line(0, "] step 3:")
    first.processes[0].send_signal(signal.SIGTERM)  # the notice reaches one host only
    first.wait()
    stopped_at = max(checkpoint_steps(tmp_path))
    assert CHECKPOINT_EVERY <= stopped_at < STEPS, first.describe()
    for process_id in range(NUM_PROCESSES):  # every host stops, after the same step
        assert f"Stopped at step {stopped_at} " in first.output(process_id), first.describe()

    second = run_job(tmp_path)
    assert f"Resuming from the checkpoint at step {stopped_at}" in second.output(0)
    before, after = tensorboard_runs(tmp_path)
    assert max(before["loss"]) == stopped_at and min(after["loss"]) == stopped_at + 1
    expected, = tensorboard_runs(straight.workdir)
    for tag in ("loss", "grad_norm", "eval_loss"):
        resumed = {**before.get(tag, {}), **after[tag]}
        steps = sorted(expected[tag])
        np.testing.assert_allclose([resumed[s] for s in steps], [expected[tag][s] for s in steps],
                                   rtol=1e-5, err_msg=tag)


@pytest.mark.slow
def test_each_process_feeds_its_own_shard_into_the_global_batch(straight):
    """Each saved iterator state is its own shard's, and step 1 trained on both shards' rows."""
    if jax.device_count() < GLOBAL_DEVICES:
        pytest.skip(f"the single-process reference needs {GLOBAL_DEVICES} devices; this test "
                    f"process has {jax.device_count()} (see tests/conftest.py)")
    config = toy_config()
    t = config.train
    local_batch = t.global_batch // NUM_PROCESSES
    first_batches = []
    for process_id, saved in enumerate(iterator_states(straight.workdir, CHECKPOINT_EVERY)):
        data_iter = pipeline.make_train_iterator(
            config.data, seq_len=t.seq_len, batch_size=local_batch, process_index=process_id,
            process_count=NUM_PROCESSES, tokenizer_name="bytes")  # the toy size's
        first_batches.append(next(data_iter))
        for _ in range(CHECKPOINT_EVERY - 1):
            next(data_iter)
        assert json.loads(json.dumps(data_iter.get_state())) == saved, process_id
        data_iter.close()
    # A saved state holds positions only (the shard is the process index given at restore), so
    # two shards may save equal states; which rows each process read is what must differ.
    assert not np.array_equal(first_batches[0]["inputs"], first_batches[1]["inputs"])

    # Step 1's loss is the initial model's loss on both shards' rows together.
    run = state_lib.build_run(config, jax.devices()[:GLOBAL_DEVICES])
    batch = {key: np.concatenate([b[key] for b in first_batches]) for key in first_batches[0]}
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        _, evaluate = loop.compile_steps(run, evaluation.language_model_loss(run), None)
        totals = evaluate(state_lib.init_state(run).params,
                          state_lib.to_global_batch(batch, run.batch_sharding), None)
    scalars, = tensorboard_runs(straight.workdir)
    assert scalars["units"][1] == float(totals["units"])
    assert scalars["loss"][1] == pytest.approx(float(totals["loss_sum"] / totals["units"]),
                                               rel=1e-5)
