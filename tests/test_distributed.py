"""Cluster detection against hand-made scheduler environments and JAX's own detectors, the
launchers' rendered command lines, and a real two-process CPU run of JAX's runtime."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src.clusters import ClusterEnv
from jax._src.clusters.cloud_tpu_cluster import GkeTpuCluster

from phi4_jax import config_base
from phi4_jax.errors import Phi4Error
from phi4_jax.parallel import launch
from phi4_jax.parallel.distributed import (ClusterEnvError, ClusterSpec, detect_cluster,
                                  initialize_distributed)

REPO = Path(__file__).resolve().parents[1]
MAIN = ["python", "-m", "phi4_jax.main", "--config=configs/pretrain.py:tiny", "--workdir=/runs/a b"]
_SCHEDULER_PREFIXES = ("SLURM_", "TPU_", "MEGASCALE_", "PHI4_", "JAX_COORDINATOR", "JAX_LOCAL",
                       "JOB_COMPLETION_INDEX", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def process_env(monkeypatch):
    """Replaces every scheduler variable in os.environ, so JAX's detectors see only `env`."""
    def set_env(env: dict[str, str]) -> None:
        for name in list(os.environ):
            if name.startswith(_SCHEDULER_PREFIXES):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return set_env


@pytest.fixture
def recorded_initialize(monkeypatch):
    """Stands in for jax.distributed.initialize and records its keyword arguments."""
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


# ---------------------------------------------------------------- explicit and Kubernetes

def test_no_scheduler_is_one_process():
    spec = detect_cluster({"HOME": "/root", "PATH": "/bin"})
    assert spec == ClusterSpec(None, 1, 0, None, "single")


def test_explicit_variables_give_the_whole_spec():
    env = {"PHI4_COORDINATOR_ADDRESS": "10.0.0.1:8476", "PHI4_NUM_PROCESSES": "4",
           "PHI4_PROCESS_ID": "2", "PHI4_LOCAL_DEVICE_IDS": "4,5,6,7"}
    assert detect_cluster(env) == ClusterSpec("10.0.0.1:8476", 4, 2, (4, 5, 6, 7), "explicit")


def test_explicit_variables_win_over_slurm_and_tpu():
    env = {"PHI4_COORDINATOR_ADDRESS": "h:1", "PHI4_NUM_PROCESSES": "2", "PHI4_PROCESS_ID": "1",
           "SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "TPU_WORKER_ID": "0"}
    assert detect_cluster(env) == ClusterSpec("h:1", 2, 1, None, "explicit")


def test_indexed_job_takes_the_process_id_from_the_completion_index():
    env = {"PHI4_COORDINATOR_ADDRESS": "pt-0.pt:8476", "PHI4_NUM_PROCESSES": "4",
           "JOB_COMPLETION_INDEX": "3", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert detect_cluster(env) == ClusterSpec("pt-0.pt:8476", 4, 3, None, "k8s")


def test_explicit_process_count_of_one_skips_the_runtime(recorded_initialize):
    env = {"PHI4_NUM_PROCESSES": "1", "PHI4_PROCESS_ID": "0"}
    spec = initialize_distributed(detect_cluster(env))
    assert spec == ClusterSpec(None, 1, 0, None, "explicit") and recorded_initialize == []


@pytest.mark.parametrize("env, names", [
    ({"PHI4_NUM_PROCESSES": "2", "PHI4_PROCESS_ID": "0"}, ["PHI4_COORDINATOR_ADDRESS"]),
    ({"PHI4_COORDINATOR_ADDRESS": "h:1", "PHI4_NUM_PROCESSES": "2"},
     ["PHI4_PROCESS_ID", "not set"]),
    ({"PHI4_COORDINATOR_ADDRESS": "h:1", "PHI4_NUM_PROCESSES": "2", "PHI4_PROCESS_ID": "2"},
     ["PHI4_PROCESS_ID=2", "0..1"]),
    ({"PHI4_COORDINATOR_ADDRESS": "h:1", "PHI4_NUM_PROCESSES": "0", "PHI4_PROCESS_ID": "0"},
     ["PHI4_NUM_PROCESSES=0"]),
    ({"PHI4_COORDINATOR_ADDRESS": "h:1", "PHI4_NUM_PROCESSES": "two", "PHI4_PROCESS_ID": "0"},
     ["PHI4_NUM_PROCESSES='two'", "integer"]),
    ({"PHI4_COORDINATOR_ADDRESS": "10.0.0.1", "PHI4_NUM_PROCESSES": "2", "PHI4_PROCESS_ID": "0"},
     ["PHI4_COORDINATOR_ADDRESS='10.0.0.1'", "host:port"]),
    ({"PHI4_COORDINATOR_ADDRESS": "h:1", "PHI4_NUM_PROCESSES": "2", "PHI4_PROCESS_ID": "0",
      "PHI4_LOCAL_DEVICE_IDS": "0,0"}, ["PHI4_LOCAL_DEVICE_IDS", "distinct"]),
    ({"PHI4_NUM_PROCESSES": "1", "PHI4_PROCESS_ID": "0", "PHI4_LOCAL_DEVICE_IDS": "1"},
     ["PHI4_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES"]),
    ({"PHI4_COORDINATOR_ADDRESS": "pt-0.pt:1", "PHI4_NUM_PROCESSES": "4",
      "JOB_COMPLETION_INDEX": "4"},
     ["JOB_COMPLETION_INDEX=4", "0..3"]),
    ({"JOB_COMPLETION_INDEX": "0"}, ["PHI4_NUM_PROCESSES", "Indexed Job"]),
], ids=["no-coordinator", "no-process-id", "id-too-big", "zero-processes", "non-integer",
        "no-port", "duplicate-devices", "devices-for-one-process", "index-too-big", "bare-index"])
def test_inconsistent_environment_names_the_variable(env, names):
    with pytest.raises(ClusterEnvError) as error:
        detect_cluster(env)
    for name in names:
        assert name in str(error.value)


OVERRIDES = ("--config.data.mix={'web': 0.5, 'code': 0.5}", "--config.train.lr=1e-4")


def _request(target: str, **fields) -> launch.Request:
    return launch.Request(**{"target": target, "config_spec": "configs/pretrain.py:1b",
                             "workdir": "/runs/a b", "nodes": 3, "devices_per_node": 8,
                             "overrides": OVERRIDES, "job_name": "pt14b", "image": "img",
                             "tpu_name": "v5p-64", "zone": "us-east5-a", **fields})


def test_jobset_manifest_gives_each_pod_its_place():
    """Renders the JobSet as the launcher does, then reads each pod's env and command."""
    yaml = pytest.importorskip("yaml")
    rendered = launch.jobset_manifest(_request("k8s"))
    assert "${" not in rendered
    jobset, = yaml.safe_load_all(rendered)
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    replicated, = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 3
    # exit status 1 (a one-line user error) fails the JobSet; anything else restarts it
    rule, = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [1]
    assert jobset["spec"]["failurePolicy"]["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]
    container, = job["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    main = "python -m phi4_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) $(OVERRIDES)"
    assert main in container["args"][0]
    pod_env = {item["name"]: item["value"] for item in container["env"]}
    assert pod_env["CONFIG"] == "configs/pretrain.py:1b" and pod_env["WORKDIR"] == "/runs/a b"
    assert tuple(shlex.split(pod_env["OVERRIDES"])) == OVERRIDES  # as bash -c will split them
    port = container["ports"][0]["containerPort"]
    for index in range(3):  # JobSet names pod i <jobset>-<job>-<job index>-<i>.<jobset>
        spec = detect_cluster({**pod_env, "JOB_COMPLETION_INDEX": str(index)})
        assert spec == ClusterSpec(f"pt14b-workers-0-0.pt14b:{port}", 3, index, None, "k8s")


@pytest.mark.parametrize("target, fields, overrides, message", [
    ("slurm", {}, {"mesh.fsdp": 5}, "--nodes=3 x --devices_per_node=8 = 24 devices: mesh sizes"),
    ("slurm", {"nodes": 3}, {"mesh.tensor": 3}, "mesh.tensor=3 does not divide the 8 devices of a node"),
    ("slurm", {"nodes": 3}, {"train.global_batch": 36, "mesh.tensor": 2},
     "train.global_batch=36 does not split over the 24 processes"),
    ("slurm", {"nodes": 2}, {"train.global_batch": 8}, "train.global_batch=8 does not split over train.microbatches=1 x 16"),
    ("tpu", {"zone": ""}, {}, "--target=tpu needs --zone"),
    ("k8s", {}, {"train.lr": -1.0}, "train.lr=-1.0"),
])
def test_inconsistent_requests_are_refused_before_submission(target, fields, overrides, message):
    config = config_base.load_config("configs/pretrain.py", "1b")
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    with pytest.raises(Phi4Error, match=re.escape(message)):
        launch.check_request(_request(target, **fields), config)


@pytest.mark.parametrize("spec, key, value, message", [
    ("dpo.py:1b", "dpo.beta", -1.0, "dpo.beta=-1.0: must be positive"),
    ("grpo.py:1b", "grpo.group_size", 1, "grpo.group_size=1"),
    ("pts_search.py:1b", "pts.p_gap", 0.0, "pts.p_gap=0.0"),
])
def test_a_stage_or_job_section_that_cannot_start_is_refused_at_launch(spec, key, value,
                                                                        message):
    config = config_base.load_config(spec)
    config.init_from = "/runs/sft"
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(Phi4Error, match=re.escape(message)):
        launch.check_request(_request("slurm", nodes=4), config)


def test_consistent_request_resolves_the_mesh():
    config = config_base.load_config("configs/pretrain.py", "1b")
    config.mesh.tensor = 2
    assert launch.check_request(_request("slurm", nodes=4), config) == {"data": 1, "fsdp": 16, "sequence": 1, "tensor": 2}


@pytest.mark.slow
def test_dry_runs_print_what_would_be_submitted_and_submit_nothing(tmp_path):
    """The CLI end to end, with sbatch, kubectl and gcloud replaced by stubs that must not run
    (refusals are checked in-process above: `main` calls `check_request` before `submit`)."""
    for tool in ("sbatch", "kubectl", "gcloud"):
        (tmp_path / tool).write_text(f"#!/bin/bash\ntouch {tmp_path}/{tool}.ran\n")
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    def run(*args):
        return subprocess.run([sys.executable, "-m", "phi4_jax.parallel.launch",
                               "--config=configs/pretrain.py:1b", "--workdir=/runs/a b", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    slurm = run("--target=slurm", "--nodes=2", "--dry_run", *OVERRIDES)
    assert slurm.returncode == 0, slurm.stderr
    words = shlex.split(slurm.stdout.strip().splitlines()[-1])
    assert words[:3] == ["CONFIG=configs/pretrain.py:1b", "WORKDIR=/runs/a b", f"REPO_DIR={REPO}"]
    assert words[3:8] == ["sbatch", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                          "--job-name=phi4"]
    assert words[8] == str(REPO / "launch/slurm.sbatch") and tuple(words[9:]) == OVERRIDES
    assert not list(tmp_path.glob("*.ran")), "a dry run submitted a job"


# ---------------------------------------------------------------- SLURM

def _slurm_env(nodelist: str, tasks: int, nodes: int, procid: int, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "123457", "SLURM_STEP_NODELIST": nodelist, "SLURM_NTASKS": str(tasks),
            "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % (tasks // nodes)), **extra}


def _jax_slurm_detection() -> tuple:
    """What JAX's own SLURM detector reads from os.environ."""
    return ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, "slurm", 10)


@pytest.mark.parametrize("env", [
    _slurm_env("gpu017", tasks=8, nodes=1, procid=5),
    _slurm_env("gpu[003-010,012],cpu7", tasks=72, nodes=9, procid=30),
    _slurm_env("gpu[07,11-12]", tasks=24, nodes=3, procid=23),
    _slurm_env("a12,b13", tasks=16, nodes=2, procid=9, JAX_COORDINATOR_PORT="7777"),
], ids=["one-node", "ranges", "list", "port-override"])
def test_slurm_one_process_per_gpu_matches_jax(env, process_env):
    process_env(env)
    spec = detect_cluster(env)
    coordinator, count, process_id, local_ids = _jax_slurm_detection()
    assert spec == ClusterSpec(coordinator, count, process_id, tuple(local_ids), "slurm")


def test_slurm_port_is_derived_from_the_job_id():
    spec = detect_cluster(_slurm_env("node[01-02]", tasks=16, nodes=2, procid=0))
    assert spec.coordinator_address == "node01:62017"  # 123457 % 4096 + 61440


@pytest.mark.parametrize("extra, gpus", [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4),
], ids=["gpus-on-node", "visible-devices"])
def test_slurm_one_process_per_node_gets_all_local_gpus(extra, gpus, process_env):
    env = _slurm_env("n[1-4]", tasks=4, nodes=4, procid=2, **extra)
    process_env(env)
    spec = detect_cluster(env)
    coordinator, count, process_id, jax_local_ids = _jax_slurm_detection()
    assert spec.coordinator_address == coordinator
    assert (spec.num_processes, spec.process_id) == (count, process_id)
    assert jax_local_ids == [0] and spec.local_device_ids == tuple(range(gpus))


def test_slurm_ntasks_per_node_of_one_without_step_node_count():
    env = _slurm_env("n[1-4]", tasks=4, nodes=4, procid=1, SLURM_NTASKS_PER_NODE="1",
                     SLURM_GPUS_ON_NODE="8")
    del env["SLURM_STEP_NUM_NODES"]
    assert detect_cluster(env).local_device_ids == tuple(range(8))


def test_slurm_initializes_through_jax_detection(recorded_initialize):
    spec = detect_cluster(_slurm_env("n[1-2]", tasks=16, nodes=2, procid=9))
    assert initialize_distributed(spec) == spec
    assert recorded_initialize == [dict(local_device_ids=[1], cluster_detection_method="slurm")]


@pytest.mark.parametrize("env", [
    {"SLURM_JOB_ID": "5"},
    _slurm_env("n1", tasks=1, nodes=1, procid=0, SLURM_GPUS_ON_NODE="8"),
], ids=["batch-script", "single-task"])
def test_slurm_single_task_keeps_all_gpus_and_skips_the_runtime(env, recorded_initialize):
    spec = initialize_distributed(detect_cluster(env))
    assert spec == ClusterSpec(None, 1, 0, None, "slurm") and recorded_initialize == []


@pytest.mark.parametrize("env, names", [
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
     ["SLURM_STEP_NODELIST", "srun"]),
    (_slurm_env("n[1-2]", tasks=2, nodes=2, procid=0),
     ["SLURM_GPUS_ON_NODE", "JAX_LOCAL_DEVICE_IDS"]),
    ({**_slurm_env("n1", tasks=8, nodes=1, procid=0), "SLURM_PROCID": "8"},
     ["SLURM_PROCID=8", "0..7"]),
], ids=["outside-srun", "unknown-gpu-count", "procid-too-big"])
def test_slurm_inconsistent_environment_names_the_variable(env, names):
    with pytest.raises(ClusterEnvError) as error:
        detect_cluster(env)
    for name in names:
        assert name in str(error.value)


# ---------------------------------------------------------------- TPU

@pytest.mark.parametrize("env", [
    {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5", "TPU_WORKER_ID": "2",
     "MEGASCALE_COORDINATOR_ADDRESS": "", "MEGASCALE_NUM_SLICES": "", "MEGASCALE_SLICE_ID": ""},
    {"TPU_PROCESS_ADDRESSES": "10.0.0.2:8471,10.0.0.3:8471", "TPU_WORKER_HOSTNAMES": "x,y,z",
     "TPU_WORKER_ID": "1", "MEGASCALE_COORDINATOR_ADDRESS": "10.0.9.9:8080",
     "MEGASCALE_NUM_SLICES": "3", "MEGASCALE_SLICE_ID": "2", "JAX_COORDINATOR_PORT": "9000"},
], ids=["one-slice", "multislice"])
def test_gke_tpu_spec_matches_jax(env, process_env):
    process_env(env)
    coordinator = GkeTpuCluster.get_coordinator_address(5, os.environ.get("JAX_COORDINATOR_PORT"))
    expected = ClusterSpec(coordinator, GkeTpuCluster.get_process_count(),
                           GkeTpuCluster.get_process_id(), None, "tpu")
    assert detect_cluster(env) == expected


def test_tpu_vm_leaves_the_counts_to_jax(recorded_initialize):
    spec = detect_cluster({"PHI4_TPU_VM": "1"})
    assert spec == ClusterSpec(None, None, None, None, "tpu")
    resolved = initialize_distributed(spec)
    assert recorded_initialize == [{}]
    assert resolved.num_processes == jax.process_count()
    assert resolved.process_id == jax.process_index()


def test_tpu_worker_id_outside_the_host_list_is_refused():
    with pytest.raises(ClusterEnvError, match="TPU_WORKER_ID=2 is outside 0..1"):
        detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "2"})


def test_explicit_spec_is_passed_to_jax_without_its_detectors(recorded_initialize):
    spec = ClusterSpec("10.0.0.1:8476", 2, 1, (0, 1), "explicit")
    assert initialize_distributed(spec) == spec
    assert recorded_initialize == [dict(coordinator_address="10.0.0.1:8476", num_processes=2,
                                        process_id=1, local_device_ids=[0, 1],
                                        cluster_detection_method="deactivate")]


# ---------------------------------------------------------------- two real processes

_WORKER = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from phi4_jax.parallel.distributed import initialize_distributed

    spec = initialize_distributed()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    local = np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * spec.process_id
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    column_sums = jax.jit(lambda a: jnp.sum(a * a, axis=0),
                          out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps(dict(process_id=spec.process_id, source=spec.source,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          device_count=jax.device_count(),
                          local_device_count=jax.local_device_count(),
                          global_shape=list(x.shape),
                          column_sums=np.asarray(column_sums).tolist())))
""")


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_reduce_over_a_global_mesh(tmp_path):
    try:
        port = _free_local_port()
    except OSError as error:
        pytest.skip(f"cannot bind a TCP port on 127.0.0.1 for the coordinator: {error}")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(_SCHEDULER_PREFIXES) and "_proxy" not in k.lower()}
    base_env.update(JAX_PLATFORMS="cpu",
                    XLA_FLAGS=re.sub(r"device_count=\d+", "device_count=4",
                                     os.environ["XLA_FLAGS"]),  # conftest's, at 4 devices
                    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")])),
                    PHI4_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", PHI4_NUM_PROCESSES="2")
    workers = [subprocess.Popen([sys.executable, str(script)],
                                env={**base_env, "PHI4_PROCESS_ID": str(i)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    try:
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]

    rows = np.concatenate([np.arange(12, dtype=np.float64).reshape(4, 3) + 100 * i
                           for i in range(2)])
    expected = (rows ** 2).sum(axis=0)
    for process_id, result in enumerate(results):
        assert result["process_id"] == result["process_index"] == process_id
        assert result["source"] == "explicit"
        counts = result["process_count"], result["device_count"], result["local_device_count"]
        assert counts == (2, 8, 4)
        assert result["global_shape"] == [8, 3]
        np.testing.assert_allclose(result["column_sums"], expected, rtol=1e-6)


# ---------------------------------------------------------------- launchers

@pytest.mark.slow
def test_xla_flag_set_is_accepted_by_xla():
    """Sources launch/xla_flags.sh and compiles; a removed flag must abort, or the check is void."""
    probe = "import jax; print(jax.config.jax_optimization_level, jax.jit(lambda x: x + 1)(1))"
    command = f"source launch/xla_flags.sh && {shlex.quote(sys.executable)} -c {shlex.quote(probe)}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("JAX_OPTIMIZATION_LEVEL", None)
    accepted = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert accepted.stdout.split() == ["O1", "2"]
    removed = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True,
                             timeout=60,
                             env={**env, "XLA_FLAGS": "--xla_gpu_enable_async_all_gather=true"})
    assert removed.returncode != 0 and "xla_gpu_enable_async_all_gather" in removed.stderr


def _run_with_fake(tool: str, script: str, env: dict[str, str], args: list[str],
                   tmp_path: Path) -> list[str]:
    """Runs a launcher with `tool` replaced by a stub that prints its arguments, one per line."""
    stub = tmp_path / tool
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    done = subprocess.run(["bash", str(REPO / script), *args], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.slow
def test_slurm_launcher_ends_in_the_main_command(tmp_path):
    env = {"CONFIG": "configs/pretrain.py:tiny", "WORKDIR": "/runs/a b",
           "OVERRIDES": "--config.x=1", "REPO_DIR": str(REPO)}
    srun_args = _run_with_fake("srun", "launch/slurm.sbatch", env, ["--config.y=2"], tmp_path)
    assert srun_args == ["--kill-on-bad-exit=1", *MAIN, "--config.x=1", "--config.y=2"]


@pytest.mark.slow
def test_tpu_vm_launcher_runs_the_main_command_on_every_worker(tmp_path):
    env = {"TPU_NAME": "v5p-64", "ZONE": "us-east5-a", "CONFIG": "configs/pretrain.py:tiny",
           "WORKDIR": "/runs/a b", "OVERRIDES": "--config.x=1"}
    gcloud_args = _run_with_fake("gcloud", "launch/tpu_vm.sh", env, ["--config.y=a b"], tmp_path)
    assert gcloud_args[:7] == ["compute", "tpus", "tpu-vm", "ssh", "v5p-64", "--zone=us-east5-a",
                               "--worker=all"]
    remote = gcloud_args[7].removeprefix("--command=")
    cd, run = remote.split(" && ")
    assert shlex.split(cd) == ["cd", "phi4_jax"]
    assert shlex.split(run) == ["PHI4_TPU_VM=1", *MAIN, "--config.x=1", "--config.y=a b"]
    assert detect_cluster({"PHI4_TPU_VM": "1"}).source == "tpu"


@pytest.mark.slow
def test_launcher_dry_runs_print_the_command_they_would_run(tmp_path):
    slurm_env = {"CONFIG": "configs/pretrain.py:tiny", "WORKDIR": "/runs/a b", "DRY_RUN": "1",
                 "REPO_DIR": str(REPO)}
    line, = _run_with_fake("srun", "launch/slurm.sbatch", slurm_env, ["--config.y=a b"], tmp_path)
    assert shlex.split(line) == ["srun", "--kill-on-bad-exit=1", *MAIN, "--config.y=a b"]
    tpu_env = {"TPU_NAME": "v5p-64", "ZONE": "us-east5-a", "CONFIG": "configs/pretrain.py:tiny",
               "WORKDIR": "/runs/a b", "DRY_RUN": "1"}
    line, = _run_with_fake("gcloud", "launch/tpu_vm.sh", tpu_env, ["--config.y=a b"], tmp_path)
    gcloud = shlex.split(line)
    assert gcloud[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5p-64"]
    assert shlex.split(gcloud[-1].removeprefix("--command=").split(" && ")[1]) == [
        "PHI4_TPU_VM=1", *MAIN, "--config.y=a b"]


@pytest.mark.slow
def test_launchers_require_config_and_workdir(tmp_path):
    for script in ("launch/slurm.sbatch", "launch/tpu_vm.sh"):
        done = subprocess.run(["bash", str(REPO / script)], capture_output=True, text=True,
                              timeout=30,
                              env={"PATH": os.environ["PATH"], "TPU_NAME": "t", "ZONE": "z"})
        assert done.returncode != 0 and "CONFIG" in done.stderr

