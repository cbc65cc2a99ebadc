"""Context parallelism: the load-balanced order by hand, and a row split 2 and 4 ways over the
`sequence` axis (alone and with fsdp and tensor) giving the unsplit loss and gradients, with
packed documents and padding; the unsplit side takes the plain `xla` attention."""

import functools

import jax
import numpy as np
import pytest

from phi4_jax import config_base
from phi4_jax.model.attention import context_parallel
from phi4_jax.model.attention.context_parallel import load_balanced_order
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.stages import evaluation
from phi4_jax.train import state as state_lib
from phi4_jax.train.step import accumulated_gradients

T = 64


def test_load_balanced_order_by_hand():
    # 2 shards: four chunks of 2; device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
    np.testing.assert_array_equal(load_balanced_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(load_balanced_order(8, 1), np.arange(8))
    order = load_balanced_order(16, 4).reshape(4, 4)
    # every device holds the same number of causal (query, key) pairs
    work = [sum(i + 1 for i in row) for row in order]
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="multiple of 2 x 4"):
        load_balanced_order(12, 4)


def _config(data=1, fsdp=1, sequence=1, tensor=1):
    c = config_base.base_config()
    c.model.size = "toy"
    c.train.update(seq_len=T, global_batch=8, steps=10, warmup_steps=0)
    c.mesh.update(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor)
    return c


def _packed_batch(seed=0, b=8):
    """Rows of three packed documents of varied lengths and some padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 512, (b, T + 1)).astype(np.int32)  # the toy vocabulary
    segments = np.zeros((b, T), np.int32)
    positions = np.zeros((b, T), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, T - 4), 2, replace=False))
        bounds = [0, *cuts, T - rng.integers(0, 5)]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segments[row, lo:hi], positions[row, lo:hi] = s, np.arange(hi - lo)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": positions, "loss_mask": (segments > 0).astype(np.float32)}


def _loss_and_grads(config, devices, batch):
    run = state_lib.build_run(config, devices)
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        params = state_lib.init_params(run)
        grads_fn = jax.jit(functools.partial(accumulated_gradients, loss_fn=evaluation.language_model_loss(run),
                                             microbatches=1))
        loss, units, _, grads = grads_fn(params, state_lib.to_global_batch(batch, run.batch_sharding),
                                         None)
    return float(loss), float(units), jax.device_get(grads)


@pytest.fixture(scope="module")
def unsplit():
    batch = _packed_batch()
    return batch, _loss_and_grads(_config(), jax.devices()[:1], batch)


@pytest.mark.parametrize("mesh", [dict(sequence=2), dict(sequence=4),
                                  dict(fsdp=2, sequence=2, tensor=2)])
def test_sequence_split_equals_unsplit(unsplit, mesh, monkeypatch):
    batch, (loss, units, grads) = unsplit
    devices = jax.devices()[:int(np.prod(list(mesh.values())))]
    local_rows = []  # each layer's per-device attention, as traced: T / sequence queries
    traced = context_parallel._local_attention
    monkeypatch.setattr(context_parallel, "_local_attention",
                        lambda q, *a, **k: local_rows.append(q.shape[1]) or traced(q, *a, **k))
    split_loss, split_units, split_grads = _loss_and_grads(_config(**mesh), devices, batch)
    assert local_rows and set(local_rows) == {T // mesh["sequence"]}
    assert split_units == units
    assert split_loss == pytest.approx(loss, rel=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5 * scale),
                 split_grads, grads)


def _reference_attention(q, k, v, seg, index, queries):
    """Float64 NumPy causal attention over packed segments, by token index, at the query
    positions `queries` (each must see at least one key); q [T, N, H]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q[queries], k, v))
    k, v = np.repeat(k, q.shape[1] // k.shape[1], 1), np.repeat(v, q.shape[1] // v.shape[1], 1)
    logits = np.einsum("tnh,snh->nts", q, k) / np.sqrt(q.shape[-1])
    at = index[queries]
    visible = ((index[None, :] <= at[:, None]) & (seg[queries][:, None] == seg[None, :])
               & (seg[None] > 0))
    logits = np.where(visible[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("nts,snh->tnh", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("shards", [1, 4])
def test_blockwise_equals_float64_reference_at_long_length(shards):
    """T=4096 of random q/k/v, three documents and padding, in the order device 0 of a
    `shards`-way split holds its queries (shards=1: plain self-attention)."""
    from phi4_jax.model.attention.blockwise import blockwise_attention
    t, rng = 4096, np.random.default_rng(1)
    q = rng.standard_normal((1, t, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, t, 2, 16)).astype(np.float32) for _ in range(2))
    seg = np.zeros(t, np.int32)
    seg[:1500], seg[1500:3900], seg[3900:4090] = 1, 2, 3
    order = load_balanced_order(t, shards)
    local = order[:t // shards]  # device 0's queries: the first and last chunks
    got = blockwise_attention(q[:, local], k[:, order], v[:, order], seg[local][None],
                              seg[order][None], block_size=256, q_index_T=local,
                              kv_index_S=order)
    # Padding queries see nothing (garbage on every path); of the rest, 1,024 spread over
    # every block are checked against the float64 reference, which costs T x 1,024 each.
    real = np.flatnonzero(seg[local] > 0)
    checked = real[::max(1, len(real) // 1024)]
    want = _reference_attention(q[0], k[0], v[0], seg, np.arange(t), local[checked])
    np.testing.assert_allclose(np.asarray(got[0])[checked], want, rtol=2e-4, atol=2e-5)
