"""The NVIDIA attention paths, as far as a CPU can check them.

- cuDNN's packed layout: the segment slots against hand-worked rows (JAX's own test rows
  among them), then end to end through JAX's own offset conversion into a float64 model of
  cuDNN's ragged semantics (each segment read from its element offset with the tensor's
  real stride), which catches both a wrong slot convention and grouped-KV striding; and the
  traced softmax-statistics buffer, which must grow with M slots, not with T.
- JAX's Pallas Triton kernel in interpret mode: values against float64 NumPy, gradients
  against the xla path, and packing isolation by perturbing one document.
- tokamax's per-query first key against the reference mask (the kernel itself needs a GPU).
"""

import builtins
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_api

from phi4_jax.model import attention as attention_lib
from phi4_jax.model.attention import check
from phi4_jax.model.attention import cudnn as cudnn_lib
from phi4_jax.model.attention import reference
from phi4_jax.model.attention import tokamax_gpu
from phi4_jax.model.config import model_config_for

B, T, N, K, H = 2, 200, 4, 2, 32
SEGMENTS = jnp.array([[1] * 70 + [2] * 90 + [3] * 40, [1] * 150 + [0] * 50], jnp.int32)
REAL = np.asarray(SEGMENTS) != 0


def _qkv(seed, b=B, t=T, n=N, k=K, h=H):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, k, h)),
            jax.random.normal(keys[2], (b, t, k, h)))


def _numpy_attention(q, k, v, seg):
    """float64 causal attention within segments, query head n reading kv head n // (N / K)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    seg = np.asarray(seg)
    k, v = (np.repeat(a, q.shape[2] // a.shape[2], axis=2) for a in (k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    allowed = (np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
               & (seg[:, None, :] != 0))[:, None]
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows see nothing: NaN, never compared
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


# --- cuDNN packed layout -------------------------------------------------------------------

def test_segment_slots_hand_worked():
    seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0]])
    offsets, lengths = cudnn_lib.segment_offsets(seg, max_segments=3)
    assert offsets.tolist() == [[0, 3, -1, -1], [0, -1, -1, -1], [0, 1, 2, -1]]
    assert lengths.tolist() == [[3, 2, -1], [6, -1, -1], [1, 1, 2]]


def test_segment_slots_reproduce_jax_test_rows():
    """Rows 0, 2 and 3 of JAX's test_sdpa_packed_layout (padding last, ids from 1 here)."""
    seg = jnp.array([[1] * 170 + [2] * 170 + [3] * 172, [1] * 190 + [2] * 190 + [0] * 132,
                     [1] * 400 + [0] * 112], jnp.int32)
    offsets, lengths = cudnn_lib.segment_offsets(seg, max_segments=3)
    assert offsets.tolist() == [[0, 170, 340, -1], [0, 190, -1, -1], [0, -1, -1, -1]]
    assert lengths.tolist() == [[170, 170, 172], [190, 190, -1], [400, -1, -1]]


def _emulated_cudnn(calls):
    """A stand-in for the private cuDNN call: JAX's own conversion of the [B, M+1] slots to
    cuDNN's flat element offsets, then float64 attention over each (offset, length) read
    with each tensor's real token stride. Tokens no segment covers come back as NaN, as an
    uninitialized buffer might."""
    def fake(query, key, value, q_seqlen=None, kv_seqlen=None, q_offsets=None,
             kv_offsets=None, *, scale, mask_type, qkv_layout):
        calls.append(mask_type)
        assert qkv_layout == "BTNH"
        q_len, kv_len, q_off, kv_off = (np.asarray(x).ravel() for x in cudnn_api._fix_seqlen_offsets(  # pylint: disable=protected-access
            q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key))
        b, t, n, h = query.shape
        kv_heads = key.shape[2]
        q_flat = np.asarray(query, np.float64).reshape(b * t, n, h)
        k_flat, v_flat = (np.asarray(x, np.float64).reshape(b * t, kv_heads, h)
                          for x in (key, value))
        out = np.full((b * t, n, h), np.nan)
        for i in np.nonzero(q_len > 0)[0]:
            q0, k0 = q_off[i] // (n * h), kv_off[i] // (kv_heads * h)
            if k0 + kv_len[i] > b * t:  # past the buffer's end: garbage, left NaN here
                continue
            q_seg = q_flat[q0:q0 + q_len[i]]
            k_seg, v_seg = (np.repeat(x[k0:k0 + kv_len[i]], n // kv_heads, axis=1)
                            for x in (k_flat, v_flat))
            logits = np.einsum("tnh,snh->nts", q_seg, k_seg) * scale
            causal = np.tril(np.ones((q_len[i], kv_len[i]), bool))
            probs = np.exp(np.where(causal, logits, -np.inf)
                           - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[q0:q0 + q_len[i]] = np.einsum("nts,snh->tnh", probs, v_seg)
        return jnp.asarray(out.reshape(b, t, n, h), query.dtype)
    return fake


def test_packed_cudnn_call_through_jax_offsets_equals_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(cudnn_api, "dot_product_attention", _emulated_cudnn(calls))
    seg = jnp.array([[1] * 70 + [2] * 90 + [3] * 40, [1] * 150 + [0] * 50,
                     [1] * 30 + [2] * 30 + [3] * 40 + [4] * 100], jnp.int32)
    q, k, v = _qkv(seed=0, b=3)
    got = np.asarray(cudnn_lib.cudnn_packed_attention(q, k, v, seg, max_segments=4))
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(got[real], _numpy_attention(q, k, v, seg)[real], atol=1e-5)
    assert np.all(got[~real] == 0.0)  # padding zeroed, never NaN
    assert calls == [cudnn_api.MaskType.PADDING_CAUSAL]


def test_repeat_probe_agrees_with_jax_offsets_on_grouped_kv(monkeypatch):
    """Unrepeated grouped K/V through this JAX's own offset conversion read the right keys
    exactly when the probe says repeating is unneeded (JAX <= 0.11.0 strides them by the
    query heads: wrong keys; jax 0.11.2 by the KV heads: right)."""
    monkeypatch.setattr(cudnn_api, "dot_product_attention", _emulated_cudnn([]))
    q, k, v = _qkv(seed=1)
    offsets, lengths = cudnn_lib.segment_offsets(SEGMENTS, 4)
    got = np.asarray(cudnn_api.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=H**-0.5, mask_type=cudnn_api.MaskType.PADDING_CAUSAL, qkv_layout="BTNH"))
    want = _numpy_attention(q, k, v, SEGMENTS)
    right = bool(np.allclose(got[REAL], want[REAL], atol=1e-5))
    assert right != cudnn_lib.needs_repeated_kv()


def _float32_shapes(fn, *args):
    """Shapes of every float32 value traced in fn's jaxpr (nested jaxprs included)."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars
                        if getattr(v.aval, "dtype", None) == jnp.float32)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)
    return set(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_packed_cudnn_keeps_m_softmax_rows_not_t(monkeypatch):
    """Traced on CPU with JAX's version checks stubbed: the backward keeps float32 softmax
    statistics of shape (B*M, N, T), and nothing float32 grows past the size of q."""
    monkeypatch.setattr(cudnn_api, "check_cudnn_version", lambda: 90800)
    monkeypatch.setattr(cudnn_api, "check_compute_capability", lambda capability: True)
    b, t, n, kv, h, m = 2, 2048, 8, 2, 64, 32
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(cudnn_lib.cudnn_packed_attention(q, k, v, seg, max_segments=m))

    shapes = _float32_shapes(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, seg)
    assert (b * m, n, t) in shapes  # 4 MiB here; with M = T slots it would be 256 MiB
    assert max(np.prod(s) for s in shapes) <= b * t * n * h


def test_single_document_rows_take_the_public_api(monkeypatch):
    seen = {}

    def fake(q, k, v, *, is_causal, query_seq_lengths, key_value_seq_lengths, implementation):
        seen.update(causal=is_causal, lengths=np.asarray(query_seq_lengths).tolist(),
                    kv_lengths=np.asarray(key_value_seq_lengths).tolist(),
                    implementation=implementation, kv_heads=k.shape[2])
        return jnp.ones(q.shape, q.dtype)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v = _qkv(seed=2)
    seg = jnp.array([[1] * 200, [1] * 150 + [0] * 50], jnp.int32)
    out = np.asarray(attention_lib.fused_attention("cudnn", q, k, v, seg, max_segments_per_row=1))
    assert seen == dict(causal=True, lengths=[200, 150], kv_lengths=[200, 150],
                        implementation="cudnn", kv_heads=K)
    assert np.all(out[1, 150:] == 0.0) and np.all(out[1, :150] == 1.0)


# --- padding kept out of the gradients ------------------------------------------------------

@jax.custom_vjp
def _garbage_outside(x_BTNH, covered_BT):
    """Identity whose gradient is NaN on tokens cuDNN computes for no one (never written)."""
    del covered_BT
    return x_BTNH


def _garbage_fwd(x_BTNH, covered_BT):
    return x_BTNH, covered_BT


def _garbage_bwd(covered_BT, g_BTNH):
    return jnp.where(covered_BT[:, :, None, None], g_BTNH, jnp.nan), None


_garbage_outside.defvjp(_garbage_fwd, _garbage_bwd)


def _leaves_garbage(q, k, v, segments_BT):
    """Attention within segments that, like cuDNN, writes neither outputs nor dQ/dK/dV on
    tokens outside every segment: NaN there, both ways."""
    covered_BT = segments_BT > 0
    q, k, v = (_garbage_outside(x, covered_BT) for x in (q, k, v))
    out = reference.xla_attention(q, k, v, segments_BT, segments_BT)
    return jnp.where(covered_BT[:, :, None, None], out, jnp.nan)


def _packed_with_garbage(query, key, value, q_seqlen=None, kv_seqlen=None, q_offsets=None,
                         kv_offsets=None, *, scale, mask_type, qkv_layout):
    """The private packed call: the tokens each slot covers, found through JAX's own
    conversion of the [B, M+1] slots to flat element offsets, get slot-wise attention."""
    del kv_seqlen, kv_offsets, scale, mask_type, qkv_layout
    q_len, _, q_off, _ = cudnn_api._fix_seqlen_offsets(  # pylint: disable=protected-access
        q_seqlen, q_seqlen, q_offsets, q_offsets, query, key)
    b, t, n, h = query.shape
    token = jnp.arange(b * t)[:, None]
    length = q_len.ravel()[None, :]
    start = q_off.ravel()[None, :length.shape[1]] // (n * h)  # the last offset is cuDNN's end
    inside = (token >= start) & (token < start + length) & (length > 0)
    slot = jnp.where(inside.any(1), jnp.argmax(inside, axis=1) + 1, 0)
    return _leaves_garbage(query, key, value, slot.reshape(b, t))


def _single_with_garbage(q, k, v, *, is_causal, query_seq_lengths, key_value_seq_lengths,
                         implementation):
    """The public call with per-row lengths: nothing past a row's length is written."""
    del key_value_seq_lengths, implementation
    assert is_causal
    real_BT = jnp.arange(q.shape[1])[None, :] < query_seq_lengths[:, None]
    return _leaves_garbage(q, k, v, real_BT.astype(jnp.int32))


def _grads(fn, q, k, v, seg, cotangent):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return [np.asarray(x) for x in (out, *pullback(cotangent))]


@pytest.mark.parametrize("max_segments, seg", [
    (1, jnp.array([[1] * 200, [1] * 150 + [0] * 50], jnp.int32)),
    (4, SEGMENTS)])
def test_cudnn_paths_keep_padding_out_of_the_gradients(monkeypatch, max_segments, seg):
    """Both cuDNN paths on a stand-in that leaves NaN wherever cuDNN writes nothing: the
    gradients at padding are exactly zero, the real ones the reference's, even with a
    cotangent on the padding."""
    monkeypatch.setattr(cudnn_api, "dot_product_attention", _packed_with_garbage)
    monkeypatch.setattr(jax.nn, "dot_product_attention", _single_with_garbage)
    monkeypatch.setattr(cudnn_lib, "needs_repeated_kv", lambda: False)
    q, k, v = _qkv(seed=3)
    cotangent = jax.random.normal(jax.random.key(4), q.shape)
    path = lambda q, k, v, s: attention_lib.fused_attention(  # noqa: E731
        "cudnn", q, k, v, s, max_segments_per_row=max_segments)
    got = _grads(path, q, k, v, seg, cotangent)
    real = np.asarray(seg) != 0
    want = _grads(lambda q, k, v, s: reference.xla_attention(q, k, v, s, s), q, k, v, seg,
                  jnp.where(jnp.asarray(real)[..., None, None], cotangent, 0))
    for g, w in zip(got, want):
        assert np.all(g[~real] == 0.0)
        np.testing.assert_allclose(g[real], w[real], atol=1e-5)


def _single_document_unzeroed_inputs(q, k, v, segments):
    """The one-document path as it was: only the output zeroed at padding."""
    real = segments > 0
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       query_seq_lengths=real.sum(1, dtype=jnp.int32),
                                       key_value_seq_lengths=real.sum(1, dtype=jnp.int32),
                                       implementation="cudnn")
    return jnp.where(real[..., None, None], out, 0)


def test_startup_check_passes_both_cudnn_paths_and_flags_padding_garbage(monkeypatch):
    monkeypatch.setattr(cudnn_api, "dot_product_attention", _packed_with_garbage)
    monkeypatch.setattr(jax.nn, "dot_product_attention", _single_with_garbage)
    monkeypatch.setattr(cudnn_lib, "needs_repeated_kv", lambda: False)
    cfg = model_config_for("tiny", attention_impl="cudnn")
    for slots in (1, 4):
        result = check.check_attention(cfg.replace(max_segments_per_row=slots),
                                       functools.partial(attention_lib.fused_attention, "cudnn",
                                                         max_segments_per_row=slots))
        assert result.padding_error == 0.0 and result.gradient_error < 1e-4
    with pytest.raises(check.AttentionCheckError, match=r"at padding inf"):
        check.check_attention(cfg.replace(max_segments_per_row=1), _single_document_unzeroed_inputs)


def test_packed_layout_needs_two_slots():
    q, k, v = _qkv(seed=3)
    with pytest.raises(ValueError, match="at least 2"):
        cudnn_lib.cudnn_packed_attention(q, k, v, SEGMENTS, max_segments=1)


# --- Pallas Triton (interpret mode) --------------------------------------------------------

# One 128-token tile after padding keeps the interpreter to a few seconds.
TRITON_SEGMENTS = jnp.array([[1] * 50 + [2] * 40 + [3] * 20 + [0] * 10], jnp.int32)
TRITON_REAL = np.asarray(TRITON_SEGMENTS) != 0


def _triton(q, k, v, seg=TRITON_SEGMENTS):
    return attention_lib.fused_attention("pallas_triton", q, k, v, seg, interpret=True)


@pytest.mark.interpret
def test_pallas_triton_values_and_gradients():
    q, k, v = _qkv(seed=4, b=1, t=120)
    seg, real = TRITON_SEGMENTS, TRITON_REAL
    np.testing.assert_allclose(np.asarray(_triton(q, k, v))[real],
                               _numpy_attention(q, k, v, seg)[real], atol=2e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real[..., None, None], fn(q, k, v), 0.0) ** 2)

    got = jax.grad(loss(_triton), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: reference.xla_attention(q, k, v, seg, seg)),
                    argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.interpret
def test_pallas_triton_isolates_packed_documents():
    q, k, v = _qkv(seed=5, b=1, t=120)
    other = _qkv(seed=6, b=1, t=120)
    doc_2 = (np.asarray(TRITON_SEGMENTS) == 2)[..., None, None]
    mixed = [jnp.where(doc_2, new, old) for old, new in zip((q, k, v), other)]
    before, after = np.asarray(_triton(q, k, v)), np.asarray(_triton(*mixed))
    others = TRITON_REAL & ~doc_2[..., 0, 0]
    np.testing.assert_array_equal(after[others], before[others])
    np.testing.assert_allclose(after[TRITON_REAL],
                               _numpy_attention(*mixed, TRITON_SEGMENTS)[TRITON_REAL], atol=2e-5)


# --- tokamax -------------------------------------------------------------------------------

def test_tokamax_first_keys_hand_worked():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 3, 3, 3, 3, 3]])
    assert tokamax_gpu.segment_starts(seg).tolist() == [[0, 0, 0, 3, 3, 5, 5],
                                                         [0, 1, 2, 2, 2, 2, 2]]


def test_tokamax_first_keys_with_causal_equal_the_reference_mask():
    starts = np.asarray(tokamax_gpu.segment_starts(SEGMENTS))
    index = np.arange(T)
    kernel_mask = (index[None, None, :] >= starts[:, :, None]) & (
        index[None, None, :] <= index[None, :, None])
    want = np.asarray(reference.mask(SEGMENTS, SEGMENTS, jnp.arange(T), jnp.arange(T)))[:, 0, 0]
    np.testing.assert_array_equal(kernel_mask[REAL], want[REAL])


def test_tokamax_import_failure_is_shown_as_it_is(monkeypatch):
    """tokamax 0.0.17 installed without xprof fails inside its own import: that is the
    message, not "install tokamax"."""
    real_import = builtins.__import__

    def without_xprof(name, *args, **kwargs):
        if name.startswith("tokamax"):
            raise ModuleNotFoundError("No module named 'xprof'", name="xprof")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_xprof)
    q, k, v = _qkv(seed=5)
    with pytest.raises(ImportError, match="importing tokamax's Mosaic GPU attention failed: "
                                          "ModuleNotFoundError: No module named 'xprof'"):
        tokamax_gpu.tokamax_attention(q, k, v, SEGMENTS)


# --- dispatch ------------------------------------------------------------------------------

def test_auto_picks_cudnn_on_gpu_for_16_bit_compute_only():
    assert attention_lib.resolve_impl("auto", 4096, 512, "bfloat16", backend="gpu") == "cudnn"
    assert attention_lib.resolve_impl("auto", 4096, 512, "float16", backend="gpu") == "cudnn"
    assert attention_lib.resolve_impl("auto", 4096, 512, "float32", backend="gpu") == "xla"
    assert attention_lib.resolve_impl("auto", 4096, 512, "float32", backend="cpu") == "blockwise"
    assert attention_lib.resolve_impl("auto", 512, 512, "float32", backend="cpu") == "xla"
    assert attention_lib.resolve_impl("tokamax", 4096, 512, "float32", backend="cpu") == "tokamax"


def test_cudnn_in_float32_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = _qkv(seed=7)
    with pytest.raises(ValueError, match="attention_impl='cudnn': cudnn takes bfloat16 or "
                                         "float16 only, not float32; set --config.model"):
        attention_lib.attention(q, k, v, q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS,
                                impl="cudnn")


@pytest.mark.parametrize("impl", ["cudnn", "pallas_triton", "tokamax"])
def test_gpu_kernels_off_gpu_say_what_to_use(impl):
    q, k, v = _qkv(seed=7)
    with pytest.raises(ValueError, match=f"model.attention_impl='{impl}' needs an NVIDIA GPU"):
        attention_lib.attention(q, k, v, q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS,
                                impl=impl)
