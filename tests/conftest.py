"""Test-wide setup: eight fake CPU devices, so sharded code runs on a laptop.

No persistent compilation cache: on XLA:CPU (jax 0.10.2) a sharded train step loaded warm from
the cache deadlocked in its first all-gather ("Expected 8 threads to join the rendezvous, but
only 1 of them arrived"), while the same step compiled fresh runs; each process compiles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
