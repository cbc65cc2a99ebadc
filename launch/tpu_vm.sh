#!/bin/bash
# One Phi-4 stage on every worker of a Cloud TPU VM slice.
#
#   TPU_NAME=phi4-v5p-128 ZONE=us-east5-a CONFIG=configs/pretrain.py \
#     WORKDIR=gs://my-bucket/runs/pt14b launch/tpu_vm.sh [--config.x=y ...]
#
# Needs the repository and its Python environment at REPO_DIR (default ~/phi4_jax) on every
# worker, and WORKDIR on storage all workers share (a gs:// bucket). Extra --config.*
# overrides come as script arguments or in OVERRIDES; PROJECT picks the GCP project.
# PHI4_TPU_VM=1 tells phi4_jax.distributed to start JAX's runtime, which then reads the
# worker list and this worker's id from the TPU metadata server. DRY_RUN=1 prints the gcloud
# command instead of running it; `python -m phi4_jax.parallel.launch --target=tpu ...` checks
# the mesh against the slice first.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-east5-a}"
: "${CONFIG:?set CONFIG, e.g. configs/pretrain.py}"
: "${WORKDIR:?set WORKDIR to storage every worker can write, e.g. gs://bucket/run}"

# Quote each piece for the remote shell; OVERRIDES is split on spaces on purpose.
arguments=""
if (($#)); then arguments=$(printf ' %q' "$@"); fi
remote_command="cd $(printf '%q' "${REPO_DIR:-phi4_jax}") && PHI4_TPU_VM=1 \
python -m phi4_jax.main --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}") \
${OVERRIDES:-}${arguments}"

command=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"}
  --worker=all --command="${remote_command}")
if [[ -n "${DRY_RUN:-}" ]]; then  # print what would run, one shell-quoted line
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
exec "${command[@]}"
