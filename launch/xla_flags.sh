# The small GPU flag set for Phi-4 training on NVIDIA H100/H200, sourced by the GPU launchers:
#   source launch/xla_flags.sh
# A variable already set in the environment wins over the value here. XLA aborts on flags it
# no longer knows (e.g. the removed --xla_gpu_enable_async_* family), so keep this set small;
# tests/test_distributed.py checks that XLA accepts it.

# O1 turns on the latency-hiding scheduler, pipelined collectives and while-loop double
# buffering: the overlap of FSDP gathers with compute comes from here.
export JAX_OPTIMIZATION_LEVEL="${JAX_OPTIMIZATION_LEVEL:-O1}"

# Let XLA's allocator take 90% of HBM at start (JAX's default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

# NVLink SHARP all-reduce on NVSwitch systems; costs some GPU memory. Set 0 to turn it off.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-1}"

# One hardware queue per GPU lets communication kernels start in issue order alongside
# compute: NVIDIA's setting for Hopper (compute capability 9.x), wrong for Blackwell.
if [[ -z "${CUDA_DEVICE_MAX_CONNECTIONS:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  if [[ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)" == 9.* ]]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=1
  fi
fi

# Combine FSDP all-gathers / reduce-scatters / all-reduces up to at least one Phi-4 layer:
# ~341M parameters = 0.68 GB in bf16, 1.36 GB in fp32, so 2 GiB by default.
PHI4_COMBINE_THRESHOLD_BYTES="${PHI4_COMBINE_THRESHOLD_BYTES:-2147483648}"
export XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }\
--xla_gpu_all_gather_combine_threshold_bytes=${PHI4_COMBINE_THRESHOLD_BYTES} \
--xla_gpu_reduce_scatter_combine_threshold_bytes=${PHI4_COMBINE_THRESHOLD_BYTES} \
--xla_gpu_all_reduce_combine_threshold_bytes=${PHI4_COMBINE_THRESHOLD_BYTES}"
