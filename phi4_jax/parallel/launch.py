r"""Checks a multi-host job against its config, then submits it with a launcher in `launch/`.

  python -m phi4_jax.parallel.launch --target=slurm --nodes=4 --config=configs/pretrain.py:1b \
      --workdir=/shared/runs/1b [--config.x=y ...] [--dry_run]
  python -m phi4_jax.parallel.launch --target=k8s --nodes=4 --image=registry/phi4_jax:latest ...
  python -m phi4_jax.parallel.launch --target=tpu --nodes=16 --devices_per_node=4 \
      --tpu_name=phi4-v5p-128 --zone=us-east5-a ...

Before anything is submitted, the config is validated and the request checked
(`check_request`): the mesh must use exactly the job's devices, tensor parallelism must stay
within a node, and the global batch must split over the processes and batch-sharded
devices; each refusal is one line naming the flag or key and the fix. `--dry_run` prints
what would be submitted (the sbatch command, the JobSet manifest, the gcloud command).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import string
import subprocess
import sys
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from phi4_jax import config_base, stages
from phi4_jax.errors import Phi4Error
from phi4_jax.parallel.sharding import MESH_AXES, MeshError, resolve_mesh_shape

LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"
TARGETS = ("slurm", "k8s", "tpu")

_TARGET = flags.DEFINE_enum("target", None, TARGETS, "Where the job runs.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. "
                                          "configs/pretrain.py:1b.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder on storage every host writes to.")
_NODES = flags.DEFINE_integer("nodes", None, "Hosts in the job (TPU: VMs of the slice).")
_DEVICES = flags.DEFINE_integer("devices_per_node", 8, "GPUs per node (TPU: chips per VM).")
_JOB_NAME = flags.DEFINE_string("job_name", "phi4", "SLURM job name or JobSet name.")
_IMAGE = flags.DEFINE_string("image", "", "Container image (k8s).")
_TPU_NAME = flags.DEFINE_string("tpu_name", "", "TPU VM slice name (tpu).")
_ZONE = flags.DEFINE_string("zone", "", "TPU zone (tpu).")
_PROJECT = flags.DEFINE_string("project", "", "GCP project (tpu; optional).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what would be submitted, submit nothing.")


class LaunchError(Phi4Error, ValueError):
    """A job request that cannot run its config; the message names the flag or key and the fix."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What to submit: where, on how many hosts and devices, which run."""

    target: str
    config_spec: str
    workdir: str
    nodes: int
    devices_per_node: int
    overrides: tuple[str, ...] = ()  # the --config.x=y words, passed on unchanged
    job_name: str = "phi4"
    image: str = ""
    tpu_name: str = ""
    zone: str = ""
    project: str = ""

    @property
    def processes(self) -> int:
        """SLURM runs one process per GPU; Kubernetes and TPU VMs one per host."""
        return self.nodes * (self.devices_per_node if self.target == "slurm" else 1)


def check_request(request: Request, config: ml_collections.ConfigDict) -> dict[str, int]:
    """Refuses a request its config cannot run on; returns the resolved mesh shape."""
    if request.target not in TARGETS:
        raise LaunchError(f"--target={request.target!r}: choose one of {', '.join(TARGETS)}.")
    for flag, value in (("--nodes", request.nodes), ("--devices_per_node", request.devices_per_node)):
        if not isinstance(value, int) or value < 1:
            raise LaunchError(f"{flag}={value}: give a positive count.")
    missing = {"k8s": ("image",), "tpu": ("tpu_name", "zone")}.get(request.target, ())
    for name in missing:
        if not getattr(request, name):
            raise LaunchError(f"--target={request.target} needs --{name}.")
    stages.check_sections(config, config_base.validate_config(config))
    devices = request.nodes * request.devices_per_node
    try:
        shape = resolve_mesh_shape({axis: config.mesh[axis] for axis in MESH_AXES}, devices)
    except MeshError as error:
        raise LaunchError(f"--nodes={request.nodes} x --devices_per_node={request.devices_per_node}"
                          f" = {devices} devices: {error}") from error
    if request.devices_per_node % shape["tensor"]:
        raise LaunchError(
            f"mesh.tensor={shape['tensor']} does not divide the {request.devices_per_node} devices "
            f"of a node, so tensor parallelism would cross nodes; choose --config.mesh.tensor from "
            f"the divisors of {request.devices_per_node}.")
    t = config.train
    batch_devices = shape["data"] * shape["fsdp"]
    for count, what in ((t.microbatches * batch_devices,
                         f"train.microbatches={t.microbatches} x {batch_devices} batch-sharded "
                         f"devices (mesh data x fsdp)"),
                        (request.processes, f"the {request.processes} processes")):
        if t.global_batch % count:
            raise LaunchError(f"train.global_batch={t.global_batch} does not split over {what}; "
                              f"make it a multiple of {count}.")
    return shape


def render(request: Request) -> tuple[list[str], dict[str, str], str | None]:
    """The command that submits the job, its extra environment, and its input (the manifest)."""
    env = {"CONFIG": request.config_spec, "WORKDIR": request.workdir}
    if request.target == "slurm":
        d = request.devices_per_node
        command = ["sbatch", f"--nodes={request.nodes}", f"--ntasks-per-node={d}",
                   f"--gpus-per-node={d}", f"--job-name={request.job_name}",
                   str(LAUNCH_DIR / "slurm.sbatch"), *request.overrides]
        return command, {**env, "REPO_DIR": str(LAUNCH_DIR.parent)}, None
    if request.target == "k8s":
        return ["kubectl", "apply", "-f", "-"], {}, jobset_manifest(request)
    env.update(TPU_NAME=request.tpu_name, ZONE=request.zone)
    if request.project:
        env["PROJECT"] = request.project
    return ["bash", str(LAUNCH_DIR / "tpu_vm.sh"), *request.overrides], env, None


def jobset_manifest(request: Request) -> str:
    """launch/k8s_jobset.yaml, without its comments, with the request's values (escaped for
    YAML's double quotes)."""
    values = {"JOB_NAME": request.job_name, "IMAGE": request.image, "NUM_NODES": request.nodes,
              "GPUS_PER_NODE": request.devices_per_node, "CONFIG": request.config_spec,
              "WORKDIR": request.workdir, "OVERRIDES": shlex.join(request.overrides)}
    escaped = {key: json.dumps(str(value))[1:-1] for key, value in values.items()}
    lines = (LAUNCH_DIR / "k8s_jobset.yaml").read_text().splitlines(keepends=True)
    template = "".join(line for line in lines if not line.startswith("#"))
    return string.Template(template).safe_substitute(escaped)


def submit(request: Request, *, dry_run: bool) -> int:
    """Runs (or, dry, prints) the submission; returns its exit status."""
    command, env, manifest = render(request)
    if dry_run and request.target == "tpu":
        command_env = {**env, "DRY_RUN": "1"}  # the launcher prints its gcloud command
        return subprocess.run(command, env={**os.environ, **command_env}, check=False).returncode
    if dry_run:
        print(manifest if manifest is not None else
              " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command)]))
        return 0
    return subprocess.run(command, input=manifest, text=True, env={**os.environ, **env},
                          check=False).returncode


def main(argv: list[str]) -> int:
    del argv
    args = sys.argv[1:]
    overrides = tuple(arg for arg in args if arg.startswith("--config."))
    config_spec = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), None)
    if config_spec is None:  # --config FILE
        config_spec = args[args.index("--config") + 1]
    request = Request(_TARGET.value, config_spec, _WORKDIR.value, _NODES.value, _DEVICES.value,
                      overrides, _JOB_NAME.value, _IMAGE.value, _TPU_NAME.value, _ZONE.value,
                      _PROJECT.value)
    try:
        shape = check_request(request, _CONFIG.value)
    except Phi4Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"# {request.target}: {request.nodes} node(s) x {request.devices_per_node} devices, "
          f"{request.processes} process(es), mesh {shape}", file=sys.stderr)
    return submit(request, dry_run=_DRY_RUN.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["target", "config", "workdir", "nodes"])
    app.run(main)
