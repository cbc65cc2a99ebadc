"""Multi-host start-up on JAX's own multi-controller runtime.

`detect_cluster` reads the launcher's environment into a `ClusterSpec` (which process this
is, how many there are, who coordinates); `initialize_distributed` hands it to
`jax.distributed.initialize`. Precedence: explicit `PHI4_*` variables, a Kubernetes JobSet's
Indexed Job (`PHI4_*` from the manifest plus `JOB_COMPLETION_INDEX`), SLURM, TPU, one process.
SLURM and TPU are left to JAX's own detection; the spec mirrors what JAX will pick, so it
can be logged (and checked) before start-up.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
from absl import logging

from phi4_jax.errors import Phi4Error

Source = Literal["single", "slurm", "k8s", "tpu", "explicit"]

COORDINATOR_VAR = "PHI4_COORDINATOR_ADDRESS"
NUM_PROCESSES_VAR = "PHI4_NUM_PROCESSES"
PROCESS_ID_VAR = "PHI4_PROCESS_ID"
LOCAL_DEVICE_IDS_VAR = "PHI4_LOCAL_DEVICE_IDS"
TPU_VM_VAR = "PHI4_TPU_VM"  # "1", set by launch/tpu_vm.sh: the worker list is in TPU metadata
COMPLETION_INDEX_VAR = "JOB_COMPLETION_INDEX"
_PHI4_VARS = (COORDINATOR_VAR, NUM_PROCESSES_VAR, PROCESS_ID_VAR, LOCAL_DEVICE_IDS_VAR)
_TPU_HOSTS_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")  # JAX reads them in this order

# JAX's defaults when JAX_COORDINATOR_PORT is unset.
_SLURM_PORT_BASE = 65536 - 4096  # port = SLURM_JOB_ID % 4096 + base
_TPU_PORT = 8482

_EXPLICIT_FIX = (f"set {COORDINATOR_VAR}=host:port, {NUM_PROCESSES_VAR} and {PROCESS_ID_VAR} "
                 "together on every process (see launch/README.md)")
_K8S_FIX = (f"the JobSet's Indexed Job must set {COORDINATOR_VAR}=<jobset>-workers-0-0.<jobset>:<port> and "
            f"{NUM_PROCESSES_VAR}=<completions>, 1 for independent single-process pods "
            "(see launch/k8s_jobset.yaml)")
_SLURM_FIX = "start every task with srun (see launch/slurm.sbatch)"


class ClusterEnvError(Phi4Error, ValueError):
    """The environment describes an incomplete or impossible cluster; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """This process's place in the job; `None` counts mean only JAX can tell (TPU metadata)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    source: Source


SINGLE_PROCESS = ClusterSpec(None, 1, 0, None, "single")


def detect_cluster(env: Mapping[str, str] = os.environ) -> ClusterSpec:
    """Reads `env` (and nothing else) into the spec this process will start with."""
    if any(name in env for name in _PHI4_VARS):
        if COMPLETION_INDEX_VAR in env and PROCESS_ID_VAR not in env:
            return _phi4_spec(env, COMPLETION_INDEX_VAR, "k8s", _K8S_FIX)
        return _phi4_spec(env, PROCESS_ID_VAR, "explicit", _EXPLICIT_FIX)
    if "SLURM_JOB_ID" in env:
        return _slurm_spec(env)
    if env.get(TPU_VM_VAR) == "1" or any(
            name in env for name in (*_TPU_HOSTS_VARS, "TPU_WORKER_ID")):
        return _tpu_spec(env)
    if COMPLETION_INDEX_VAR in env:
        raise ClusterEnvError(f"{COMPLETION_INDEX_VAR} is set but {NUM_PROCESSES_VAR} is not: "
                              f"{_K8S_FIX}.")
    return SINGLE_PROCESS


def initialize_distributed(spec: ClusterSpec | None = None) -> ClusterSpec:
    """Starts JAX's multi-controller runtime for `spec` (detected when None); no-op for one process.

    Must run before anything touches a JAX backend. Returns the spec, with counts filled in
    once JAX has read them from TPU metadata.
    """
    spec = detect_cluster() if spec is None else spec
    logging.info("Cluster: %s", spec)
    if spec.source != "tpu" and spec.num_processes == 1:
        return spec
    jax.distributed.initialize(**_initialize_kwargs(spec))
    if spec.num_processes is None:
        spec = dataclasses.replace(spec, num_processes=jax.process_count(),
                                   process_id=jax.process_index())
        logging.info("Cluster as read by JAX: %s", spec)
    return spec


def _initialize_kwargs(spec: ClusterSpec) -> dict[str, Any]:
    """What `jax.distributed.initialize` needs to end up exactly at `spec`."""
    local_ids = None if spec.local_device_ids is None else list(spec.local_device_ids)
    if spec.source in ("explicit", "k8s"):
        # "deactivate" keeps JAX's own detectors (SLURM, the kubernetes client) out of it.
        return dict(coordinator_address=spec.coordinator_address,
                    num_processes=spec.num_processes, process_id=spec.process_id,
                    local_device_ids=local_ids, cluster_detection_method="deactivate")
    if spec.source == "slurm":
        return dict(local_device_ids=local_ids, cluster_detection_method="slurm")
    if spec.source == "tpu":
        return {}
    raise ValueError(f"ClusterSpec(source={spec.source!r}) with num_processes="
                     f"{spec.num_processes}: describe a multi-process job as 'explicit'.")


def _phi4_spec(env: Mapping[str, str], process_id_var: str, source: Source,
               fix: str) -> ClusterSpec:
    """Explicit or Kubernetes: count and coordinator from PHI4_*, id from `process_id_var`."""
    num_processes = _int_var(env, NUM_PROCESSES_VAR, fix)
    process_id = _int_var(env, process_id_var, fix)
    _check_rank(process_id, num_processes, process_id_var, NUM_PROCESSES_VAR)
    if num_processes == 1:
        if LOCAL_DEVICE_IDS_VAR in env:
            raise ClusterEnvError(
                f"{LOCAL_DEVICE_IDS_VAR} only applies when {NUM_PROCESSES_VAR} > 1; for one "
                "process restrict devices with CUDA_VISIBLE_DEVICES.")
        return dataclasses.replace(SINGLE_PROCESS, source=source)
    coordinator = env.get(COORDINATOR_VAR)
    _check_coordinator(coordinator, COORDINATOR_VAR, fix)
    local_ids = _device_ids(env, LOCAL_DEVICE_IDS_VAR) or _device_ids(env, "JAX_LOCAL_DEVICE_IDS")
    return ClusterSpec(coordinator, num_processes, process_id, local_ids, source)


def _slurm_spec(env: Mapping[str, str]) -> ClusterSpec:
    """What JAX's SLURM detection will pick, with all local GPUs for one process per node."""
    if "SLURM_NTASKS" not in env:
        return dataclasses.replace(SINGLE_PROCESS, source="slurm")
    num_processes = _int_var(env, "SLURM_NTASKS", _SLURM_FIX)
    if num_processes == 1:  # skip JAX, which would hide all but GPU SLURM_LOCALID
        return dataclasses.replace(SINGLE_PROCESS, source="slurm")
    for name in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        if name not in env:
            raise ClusterEnvError(
                f"SLURM_NTASKS={num_processes} but {name} is unset: {_SLURM_FIX}.")
    process_id = _int_var(env, "SLURM_PROCID", _SLURM_FIX)
    _check_rank(process_id, num_processes, "SLURM_PROCID", "SLURM_NTASKS")
    port = env.get("JAX_COORDINATOR_PORT") or str(
        _int_var(env, "SLURM_JOB_ID", _SLURM_FIX) % 4096 + _SLURM_PORT_BASE)
    coordinator = (env.get("JAX_COORDINATOR_ADDRESS")
                   or f"{_first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}")
    return ClusterSpec(coordinator, num_processes, process_id,
                       _slurm_local_device_ids(env, num_processes), "slurm")


def _slurm_local_device_ids(env: Mapping[str, str], num_processes: int) -> tuple[int, ...]:
    """One GPU per task (JAX's default), or every GPU of the node for one task per node."""
    if explicit := _device_ids(env, "JAX_LOCAL_DEVICE_IDS"):
        return explicit
    if "SLURM_STEP_NUM_NODES" in env:
        one_per_node = _int_var(env, "SLURM_STEP_NUM_NODES", _SLURM_FIX) == num_processes
    else:
        one_per_node = env.get("SLURM_NTASKS_PER_NODE") == "1"
    if not one_per_node:
        return (_int_var(env, "SLURM_LOCALID", _SLURM_FIX),)
    if "SLURM_GPUS_ON_NODE" in env:
        return tuple(range(_int_var(env, "SLURM_GPUS_ON_NODE", _SLURM_FIX)))
    if visible := env.get("CUDA_VISIBLE_DEVICES"):
        return tuple(range(len(visible.split(","))))
    raise ClusterEnvError(
        "one SLURM task per node, but neither SLURM_GPUS_ON_NODE nor CUDA_VISIBLE_DEVICES says "
        "how many GPUs it has: request them with --gpus-per-node, or set "
        "JAX_LOCAL_DEVICE_IDS=0,1,...,7.")


def _first_slurm_host(nodelist: str) -> str:
    """'node[003-010,012],gpu7' -> 'node003': the host JAX picks as coordinator."""
    match = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", nodelist)
    return match.group(1) + (match.group(2) or "")


def _tpu_spec(env: Mapping[str, str]) -> ClusterSpec:
    """GKE names the workers in env, mirrored here; on a TPU VM only JAX (via metadata) can."""
    hosts = next((env[name] for name in _TPU_HOSTS_VARS if name in env), None)
    if hosts is None:
        return ClusterSpec(None, None, None, None, "tpu")
    fix = "the TPU pod spec sets TPU_WORKER_ID with TPU_WORKER_HOSTNAMES; set both or neither"
    per_slice = len(hosts.split(","))
    worker_id = _int_var(env, "TPU_WORKER_ID", fix)
    _check_rank(worker_id, per_slice, "TPU_WORKER_ID", "the number of TPU_WORKER_HOSTNAMES")
    num_slices = int(env.get("MEGASCALE_NUM_SLICES") or 1)
    slice_id = int(env.get("MEGASCALE_SLICE_ID") or 0)
    host = (env.get("MEGASCALE_COORDINATOR_ADDRESS") or hosts.split(",")[0]).split(":")[0]
    coordinator = (env.get("JAX_COORDINATOR_ADDRESS")
                   or f"{host}:{env.get('JAX_COORDINATOR_PORT') or _TPU_PORT}")
    return ClusterSpec(coordinator, per_slice * num_slices, worker_id + slice_id * per_slice,
                       None, "tpu")


def _int_var(env: Mapping[str, str], name: str, fix: str) -> int:
    """The integer in `env[name]`, or an error naming the variable and the fix."""
    if name not in env:
        raise ClusterEnvError(f"{name} is not set: {fix}.")
    try:
        return int(env[name])
    except ValueError:
        raise ClusterEnvError(f"{name}={env[name]!r} is not an integer: {fix}.") from None


def _check_rank(process_id: int, num_processes: int, id_name: str, count_name: str) -> None:
    """Process ids must be the dense range 0..count-1 that JAX expects."""
    if num_processes < 1:
        raise ClusterEnvError(f"{count_name}={num_processes}: a job needs at least one process.")
    if not 0 <= process_id < num_processes:
        raise ClusterEnvError(
            f"{id_name}={process_id} is outside 0..{num_processes - 1} ({count_name}="
            f"{num_processes}): give each process a distinct id below the process count.")


def _check_coordinator(address: str | None, name: str, fix: str) -> None:
    """A reachable 'host:port' that every process agrees on."""
    if not address:
        raise ClusterEnvError(f"{name} is not set, and more than one process needs a coordinator: "
                              f"{fix}.")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterEnvError(f"{name}={address!r} is not 'host:port' with a port in 1..65535 "
                              "(process 0's host, e.g. 10.0.0.1:8476).")


def _device_ids(env: Mapping[str, str], name: str) -> tuple[int, ...] | None:
    """'0,1,2,3' -> (0, 1, 2, 3); None when `name` is unset or empty."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        ids = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ClusterEnvError(f"{name}={raw!r}: write local device ids as '0,1,2,3'.") from None
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise ClusterEnvError(f"{name}={raw!r}: ids must be distinct and non-negative.")
    return ids
