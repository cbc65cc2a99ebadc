"""Phi-4-mini: LongRoPE against transformers' Phi3ForCausalLM and a float64 NumPy rotation,
on both sides of the original context; the released config and parameter count; import and
export of Phi-4-mini-format checkpoints with logit parity."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.hf  # parity with transformers
torch = pytest.importorskip("torch", reason="torch is needed for the transformers reference")
transformers = pytest.importorskip("transformers",
                                   reason="transformers provides the Phi3ForCausalLM reference")

from phi4_jax.interop import hf_checkpoint as hf  # noqa: E402
from phi4_jax.model.config import PHI4_MINI_LONG_ROPE, model_config_for, param_count  # noqa: E402
from phi4_jax.model.rope import LongRoPE, apply_rope  # noqa: E402
from phi4_jax.model.transformer import init_model  # noqa: E402

torch.set_num_threads(1)
ORIGINAL = 16
# A tiny LongRoPE model: rotary 12 of 16 head dims (6 pairs), an original context of 16
# positions extended 16x (attention factor sqrt(2)), tied embeddings, as Phi-4-mini is built.
TINY_MINI_HF = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75, rope_theta=10_000.0,
    max_position_embeddings=16 * ORIGINAL, original_max_position_embeddings=ORIGINAL,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                  "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})


def _hf_model(seed: int = 0):
    config = transformers.Phi3Config(**TINY_MINI_HF, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model


def _logits(model, cfg, params, length):
    tokens = np.random.default_rng(length).integers(0, 512, (2, length))
    with torch.no_grad():
        reference = model(torch.from_numpy(tokens)).logits.float().numpy()
    jax_model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg))), params)
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    return np.asarray(jax_model(jnp.asarray(tokens), positions, jnp.ones_like(positions))), reference


def _assert_close(actual, reference):
    err = np.max(np.abs(actual - reference))
    assert err <= 1e-4 * np.max(np.abs(reference)), (err, np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = _hf_model()
    directory = tmp_path_factory.mktemp("mini") / "hf"
    model.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("length", [ORIGINAL - 4, ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL])
def test_longrope_import_matches_transformers_on_both_sides_of_the_original_context(
        hf_dir, length):
    model, directory = hf_dir
    cfg = hf.model_config_from_hf(directory)
    assert cfg.long_rope.long_factor == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    assert (cfg.long_rope.original_max_positions, cfg.long_rope.max_positions) == (16, 256)
    assert math.isclose(cfg.long_rope.scale, math.sqrt(2.0))
    actual, reference = _logits(model, cfg, hf.load_hf_checkpoint(directory, cfg), length)
    _assert_close(actual, reference)


def test_short_and_long_factors_give_different_logits(hf_dir):
    """The parity above is not vacuous: the long factors change the long forward."""
    model, directory = hf_dir
    cfg = hf.model_config_from_hf(directory)
    short_only = cfg.replace(long_rope=LongRoPE(
        cfg.long_rope.short_factor, cfg.long_rope.short_factor, ORIGINAL, 16 * ORIGINAL))
    params = hf.load_hf_checkpoint(directory, cfg)
    wrong, reference = _logits(model, short_only, params, 2 * ORIGINAL)
    assert np.max(np.abs(wrong - reference)) > 1e-2 * np.max(np.abs(reference))


def _numpy_rope(x, positions, theta, rotary_dim, rope):
    """Float64 LongRoPE by the formula: factors by max(positions) + 1 > original."""
    factors = np.asarray(rope.long_factor if positions.max() + 1 > rope.original_max_positions
                         else rope.short_factor)
    inv_freq = 1.0 / (factors * theta ** (np.arange(0, rotary_dim, 2) / rotary_dim))
    angles = positions[..., None] * inv_freq
    cos, sin = np.cos(angles)[:, :, None] * rope.scale, np.sin(angles)[:, :, None] * rope.scale
    x1, x2 = x[..., :rotary_dim // 2], x[..., rotary_dim // 2:rotary_dim]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]], -1)


@pytest.mark.parametrize("longest", [ORIGINAL - 1, ORIGINAL])  # last short / first long forward
def test_rope_switches_for_the_whole_batch_at_the_original_length(longest):
    rope = LongRoPE((1.0, 1.5, 2.0), (3.0, 5.0, 9.0), ORIGINAL, 4 * ORIGINAL)
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 8))
    positions = np.stack([np.arange(5), np.arange(longest - 4, longest + 1)])  # row 0 stays short
    actual = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), theta=10_000.0,
                        rotary_dim=6, long_rope=rope)
    reference = _numpy_rope(x, positions, 10_000.0, 6, rope)
    np.testing.assert_allclose(np.asarray(actual), reference, rtol=1e-5, atol=1e-5)


def test_export_reloads_in_transformers_with_its_longrope(hf_dir, tmp_path):
    model, directory = hf_dir
    cfg = hf.model_config_from_hf(directory)
    params = hf.load_hf_checkpoint(directory, cfg)
    out = hf.save_hf_checkpoint(params, cfg, tmp_path / "export", dtype="float32",
                                token_ids=hf.SpecialTokenIds(1, 2, 3))
    reloaded = transformers.Phi3ForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters["long_factor"] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    actual, reference = _logits(reloaded, cfg, params, 2 * ORIGINAL)
    _assert_close(actual, reference)
    assert hf.model_config_from_hf(out) == cfg


# microsoft/Phi-4-mini-instruct config.json (the fields a Phi3Config reads).
RELEASED_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False,
    "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
    "partial_rotary_factor": 0.75, "rope_theta": 10000.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                     "long_factor": [1, *PHI4_MINI_LONG_ROPE.long_factor[1:]]},
    "sliding_window": 262144, "tie_word_embeddings": True, "vocab_size": 200064,
    "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999}


def test_released_config_is_the_phi4_mini_size_with_its_released_count():
    ours = hf.model_config_from_hf(RELEASED_MINI)
    assert ours == model_config_for("phi4-mini").replace(name="hf")
    # 3.8B as released; x 2 bytes = 7.67 GB, the size of its two bf16 shards (4.9 + 2.77 GB).
    assert param_count(ours) == 3_836_021_760
    assert math.isclose(ours.long_rope.scale, math.sqrt(1 + math.log(32) / math.log(4096)))
    written = hf.hf_config_dict(ours)
    assert written["rope_scaling"] == {**RELEASED_MINI["rope_scaling"],
                                       "long_factor": list(PHI4_MINI_LONG_ROPE.long_factor)}
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (
        199999, 199999, 199999)
    theirs = transformers.Phi3Config.from_dict(written)
    assert theirs.rope_parameters["rope_type"] == "longrope"
    assert hf.model_config_from_hf(theirs.to_dict()) == ours


def test_phi4_mini_tensor_shapes_match_the_release():
    shapes = {t.name: t.shape for t in hf._hf_tensors(model_config_for("phi4-mini"))}
    assert len(shapes) == 32 * 6 + 2 and "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight"] == (200064, 3072)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (5120, 3072)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (16384, 3072)
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (3072, 8192)
