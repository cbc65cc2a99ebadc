"""`train.host_memory`: which processes count as CPU-only, and that the setting stops a jitted
function's scratch from being faulted in afresh on every call."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from phi4_jax.train import host_memory


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cuda", False), ("cpu,cuda", False),
                                                 ("tpu", False), (" cpu ", True)])
def test_cpu_only_follows_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.cpu_only() is expected


def test_cpu_only_without_jax_platforms_looks_for_accelerator_plugins(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert host_memory.cpu_only()
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: ["xla_cuda12"] if group == "jax_plugins" else [])
    assert not host_memory.cpu_only()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert not host_memory.cpu_only()


def test_opt_out_variable(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT_VAR, "0")
    assert not host_memory.keep_freed_memory()


# A child process: the setting (or not), then a jitted function whose 64 MiB intermediate XLA
# holds in its scratch buffer, called 12 times; the minor page faults of each call. The heap
# settles over the first calls (a call's scratch may be allocated before the last one's is
# freed), so the last four are the steady state.
_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from phi4_jax.train import host_memory
    applied = sys.argv[1] == "keep" and host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jax.lax.optimization_barrier(jnp.sin(x) * 2.0).sum())
    x = jnp.ones((4096, 4096), jnp.float32)
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        time.sleep(0.1)
    print(json.dumps({"applied": applied, "temp_pages": temp // 4096, "faults": faults}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_not_faulted_in_again():
    def child(mode):
        out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                             check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "",
                                              "PYTHONPATH": ":".join(sys.path)})
        return json.loads(out.stdout.strip().splitlines()[-1])

    default, kept = child("default"), child("keep")
    assert kept["applied"] and not default["applied"]
    assert default["temp_pages"] >= 16384  # the 64 MiB intermediate is scratch
    # Without the setting every call faults its scratch in again; with it, nothing once settled.
    assert min(default["faults"][-4:]) >= default["temp_pages"] // 2, default
    assert sum(kept["faults"][-4:]) < kept["temp_pages"] // 20, kept
