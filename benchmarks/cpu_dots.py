r"""The train step's matmuls alone on CPU: XLA (jax.jit) against torch, in the three forms a
linear layer's step runs.

For `y = x @ W` (x [N, D], W [D, F]) the forward is a plain dot (NN), the input gradient
`dy @ W^T` contracts the second operand's last axis (NT), and the weight gradient `x^T @ dy`
contracts both operands' first axis (TN). torch hands all three to one GEMM with transpose
flags; the question is what XLA's CPU backend pays for the transposed forms. The shapes are
125m's (D 768, F 2048) at the body benchmark's 2 x 256 = 512 positions. Each form is timed
`--repeats` times, interleaved, the best of each kept; results are float32 on the same
inputs, checked equal to 1e-4. The last row is the weight gradient with the transposed copy
of the smaller operand forced, the form the model's projections use on CPU without remat
(`model.lora.einsum_plain_weight_grad`).

  python benchmarks/cpu_dots.py
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved rounds; the best of each is kept.")
_CALLS = flags.DEFINE_integer("calls", 20, "Calls per timing.")

N, D, F = 512, 768, 2048
FORMS = {  # name -> (lhs shape, rhs shape, jax function, torch function)
    "NN  x @ W      (forward)": ((N, D), (D, F), lambda a, b: a @ b, lambda a, b: a @ b),
    "NT  dy @ W^T   (input gradient)": ((N, F), (D, F), lambda a, b: a @ b.T, lambda a, b: a @ b.T),
    "TN  x^T @ dy   (weight gradient)": ((N, D), (N, F), lambda a, b: a.T @ b, lambda a, b: a.T @ b),
    # The same, x copied to [D, N] first behind a barrier that keeps XLA from folding the
    # transpose back into the dot: the copy is of the smaller operand, the dot plain NN.
    "TN  via x^T copied first": ((N, D), (N, F),
                                 lambda a, b: jax.lax.optimization_barrier(a.T) @ b,
                                 lambda a, b: a.T @ b),
}


def _seconds(fn, *args) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(_CALLS.value):
        out = fn(*args)
    if hasattr(out, "block_until_ready"):
        out.block_until_ready()
    return (time.perf_counter() - start) / _CALLS.value


def main(argv: list[str]) -> None:
    del argv
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"N {N}, D {D}, F {F}, float32, best of {_REPEATS.value} rounds of {_CALLS.value} calls")
    print("| form | XLA ms | torch ms | XLA GFLOP/s | XLA time / torch time |")
    print("|---|---:|---:|---:|---:|")
    for name, (lhs, rhs, jax_fn, torch_fn) in FORMS.items():
        a, b = rng.standard_normal(lhs, np.float32), rng.standard_normal(rhs, np.float32)
        jitted, ja, jb = jax.jit(jax_fn), jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        np.testing.assert_allclose(np.asarray(jitted(ja, jb)), torch_fn(ta, tb).numpy(),
                                   rtol=1e-4, atol=1e-3)
        xla, ref = [], []
        for _ in range(_REPEATS.value):
            xla.append(_seconds(jitted, ja, jb))
            ref.append(_seconds(torch_fn, ta, tb))
        flop = 2 * N * D * F
        print(f"| {name} | {min(xla) * 1e3:.2f} | {min(ref) * 1e3:.2f} | "
              f"{flop / min(xla) / 1e9:.0f} | {min(xla) / min(ref):.2f} |")


if __name__ == "__main__":
    app.run(main)
