"""Model FLOPs against hand counts and parameter shapes; device-kind peaks; MFU arithmetic."""

import jax
import numpy as np
import pytest
from flax import nnx

from phi4_jax.train import flops
from phi4_jax.model.transformer import init_model
from phi4_jax.model.config import model_config_for

PHI4 = model_config_for("phi4-14b")


def _matmul_flops_from_shapes(cfg) -> float:
    """2 FLOPs per weight of every matmul, from the real parameter shapes (gather excluded)."""
    abstract = nnx.eval_shape(lambda: init_model(cfg))
    state = nnx.state(abstract, nnx.Param)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = jax.tree_util.keystr(path)
        if "norm" in name or ("embed_VD" in name and not cfg.tie_embeddings):
            continue  # norm scales are not matmuls; an untied embedding is only gathered
        total += 2 * int(np.prod(leaf.shape))
    return float(total)


def test_tiny_forward_by_hand():
    cfg = model_config_for("tiny", vocab_size=100)  # D=64, N=4, K=2, H=16, F=192, L=2
    qkv, out, mlp = 2 * 64 * (4 + 2 * 2) * 16, 2 * 4 * 16 * 64, 2 * 3 * 64 * 192
    assert (qkv, out, mlp) == (16384, 8192, 73728)
    causal_attention = 4 * 8 * 4 * 16 // 2
    expected = 2 * (qkv + out + mlp + causal_attention) + 2 * 64 * 100
    assert expected == 211_456
    assert flops.forward_flops_per_token(cfg, 8) == expected
    full_attention_extra = 2 * causal_attention  # two layers, each the other half of 4*T*N*H
    assert flops.forward_flops_per_token(cfg, 8, causal=False) == expected + full_attention_extra
    assert flops.train_flops_per_token(cfg, 8) == 3 * expected


@pytest.mark.parametrize("size, tie", [("phi4-14b", False), ("phi4-mini", True), ("tiny", False)])
def test_matmul_flops_match_parameter_shapes(size, tie):
    cfg = model_config_for(size)
    assert cfg.tie_embeddings == tie
    t = 1024
    attention = cfg.num_layers * 2 * t * cfg.num_heads * cfg.head_dim  # causal: half of 4*T*N*H
    assert flops.forward_flops_per_token(cfg, t) == pytest.approx(
        _matmul_flops_from_shapes(cfg) + attention, rel=1e-12)


def test_phi4_14b_published_numbers():
    # GPU_NOTES: 6N = 84.9 GFLOP/token; causal attention adds 5.0 at 4K and 20.1 at 16K.
    d, n, k, h, f, v, layers = 5120, 40, 10, 128, 17920, 100352, 40
    forward_matmuls = layers * (2 * d * (n + 2 * k) * h + 2 * n * h * d + 6 * d * f) + 2 * d * v
    assert round(3 * forward_matmuls / 1e9, 1) == 84.9
    for t, extra_gflop in ((4096, 5.0), (16384, 20.1)):
        with_attention = flops.train_flops_per_token(PHI4, t) / 1e9
        assert round(with_attention - 3 * forward_matmuls / 1e9, 1) == extra_gflop


def test_causal_halves_attention_only():
    full = flops.forward_flops_per_token(PHI4, 4096, causal=False)
    causal = flops.forward_flops_per_token(PHI4, 4096)
    assert full - causal == pytest.approx(40 * 2 * 4096 * 40 * 128)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2250e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("tpu v6e", 918e12),
])
def test_known_device_kinds(kind, peak):
    assert flops.peak_flops(kind) == peak


@pytest.mark.parametrize("kind", ["cpu", "TPU v4 lite", "TPU7x", "NVIDIA H20", "NVIDIA H800",
                                  "NVIDIA GB200", "NVIDIA GeForce RTX 4090", ""])
def test_unknown_device_kinds_have_no_peak(kind):
    assert flops.peak_flops(kind) is None


def test_override_wins_and_must_be_positive():
    assert flops.peak_flops("cpu", override=1e12) == 1e12
    assert flops.peak_flops("NVIDIA H200", override=5e14) == 5e14
    with pytest.raises(ValueError, match="positive"):
        flops.peak_flops("cpu", override=0.0)


def test_mfu_arithmetic():
    cfg = model_config_for("tiny", vocab_size=100)
    assert flops.mfu(1000.0, cfg, 8, 1e9) == pytest.approx(1000 * 3 * 211_456 / 1e9)
    # 3000 tokens/s/GPU of phi4-14b at 4K on an H200: (84.9 + 5.0) GFLOP * 3000 / 989 TFLOP/s.
    phi4 = flops.mfu(3000.0, PHI4, 4096, flops.peak_flops("NVIDIA H200"))
    assert phi4 == pytest.approx(89.9e9 * 3000 / 989e12, rel=1e-3)
    assert flops.mfu(3000.0, PHI4, 4096, flops.peak_flops("cpu")) is None


@pytest.mark.parametrize("call, match", [
    (lambda: flops.mfu(-1.0, PHI4, 4096, 1e12), "tokens_per_second"),
    (lambda: flops.mfu(1.0, PHI4, 4096, 0.0), "peak"),
    (lambda: flops.forward_flops_per_token(PHI4, 0), "seq_len"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
