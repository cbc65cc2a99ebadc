"""Mid-training (configs/midtrain.py): the paper's numbers as a diff of pretraining, the start from
a pretraining checkpoint with the new RoPE base in effect (checked against a float64 NumPy
attention), the init_from refusals, and a toy-model step at 16,384 tokens."""

import jax
import numpy as np
import pytest
from flax import nnx

from phi4_jax import config_base, stages
from phi4_jax.stages import evaluation
from phi4_jax.train import initial_params, loop
from phi4_jax.train import state as state_lib

PAPER_MIX = {"web": 0.15, "web_rewrites": 0.15, "synthetic": 0.40, "code": 0.20, "books": 0.10}


def _load(name, arg=None):
    return config_base.load_config(f"configs/{name}.py", arg)


def test_paper_config_is_pretraining_plus_the_published_diff():
    pre, mid = _load("pretrain"), _load("midtrain")
    assert (mid.train.seq_len, mid.model.max_positions) == (16384, 16384)
    assert mid.model.rope_theta == 250_000.0
    assert mid.train.lr == pytest.approx(pre.train.lr / 10) == pytest.approx(3e-5)
    tokens = mid.train.steps * mid.train.global_batch * mid.train.seq_len
    assert abs(tokens - 250e9) <= mid.train.global_batch * mid.train.seq_len
    assert mid.data.mix.long == pytest.approx(0.30)
    assert mid.data.sources.long.min_tokens == 8192  # documents longer than 8K tokens
    for name, weight in PAPER_MIX.items():  # the replay share keeps pretraining's sources and weights
        assert mid.data.mix[name] == pytest.approx(0.70 * weight)
        assert mid.data.sources[name] == pre.data.sources[name]
    unchanged = ("model.size", "model.compute_dtype", "train.weight_decay", "train.schedule",
                 "train.b1", "train.b2", "train.grad_clip", "mesh.rules")
    for key in unchanged:
        section, leaf = key.split(".")
        assert mid[section][leaf] == pre[section][leaf], key
    config_base.validate_config(mid)


@pytest.mark.parametrize("arg", ["tiny", "125m", "1b", "14b-4l"])
def test_sizes_follow_pretraining_with_four_times_the_context(arg):
    pre, mid = _load("pretrain", arg), _load("midtrain", arg)
    assert mid.model.size == pre.model.size
    assert mid.train.seq_len == 4 * pre.train.seq_len
    assert mid.train.global_batch * mid.train.seq_len == pre.train.global_batch * pre.train.seq_len
    assert mid.model.rope_theta == 250_000.0 and mid.train.lr == pytest.approx(pre.train.lr / 10)
    assert mid.data.sources.long.min_tokens == mid.train.seq_len // 2
    config_base.validate_config(mid)


def _midtrain_toy(init_from, **train):
    c = _load("midtrain", "toy")
    c.init_from = str(init_from)
    c.train.update(**{"global_batch": 8, **train})
    return c


def _rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * scale


def _rope(x_TNH, theta):
    """Half-split RoPE in float64, written from the Phi-3 reference (rotate_half)."""
    t, _, h = x_TNH.shape
    inv = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)
    angles = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x_TNH[..., :h // 2], x_TNH[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _first_attention_reference(p, tokens, theta):
    """Layer 0's attention output [T, D] for one document, float64 NumPy."""
    f = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = _rms_norm(f["embed"][tokens], f["norm"])
    q = _rope(np.einsum("td,dnh->tnh", x, f["q"]), theta)
    k = _rope(np.einsum("td,dkh->tkh", x, f["k"]), theta)
    v = np.einsum("td,dkh->tkh", x, f["v"])
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    logits = np.einsum("tnh,snh->nts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((len(tokens),) * 2, bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("nhd,tnh->td", f["o"], np.einsum("nts,snh->tnh", probs, v))


def _loader(run, stage_name):
    """The training loop's loader of `init_from`'s parameters, located as the loop locates it."""
    return loop._initial_params_loader(run, stage_name,
                                       initial_params.locate(run.config.init_from))


@pytest.mark.slow
def test_restored_pretraining_checkpoint_attends_with_the_new_rope_base(pretrained_toy):
    config = _midtrain_toy(pretrained_toy)
    run = state_lib.build_run(config)
    assert run.model_cfg.rope_theta == 250_000.0
    params = _loader(run, "pretrain")()
    model = nnx.merge(run.graphdef, params)
    block_def, stacked = nnx.split(model.blocks)
    block = nnx.merge(block_def, jax.tree.map(lambda a: a[0], stacked))
    tokens = np.random.default_rng(0).integers(0, 512, 48)  # toy vocabulary
    positions, segments = np.arange(48)[None], np.ones((1, 48), np.int32)
    x = jax.numpy.asarray(params["embed_VD"])[tokens][None]
    got = np.asarray(block.attn(block.attn_norm(x), positions, segments)[0][0], np.float64)
    layer = jax.device_get(params["blocks"])
    p = {"embed": params["embed_VD"], "norm": layer["attn_norm"]["scale"][0],
         "q": layer["attn"]["q_DNH"][0], "k": layer["attn"]["k_DKH"][0],
         "v": layer["attn"]["v_DKH"][0], "o": layer["attn"]["o_NHD"][0]}
    want = _first_attention_reference(p, tokens, 250_000.0)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
    old_base = _first_attention_reference(p, tokens, 10_000.0)
    assert np.abs(got - old_base).max() > 100 * np.abs(got - want).max()


@pytest.mark.slow
def test_a_missing_or_other_size_checkpoint_is_one_line_before_compiling(pretrained_toy):
    with pytest.raises(config_base.ConfigError, match="init_from='/no/such/run': no such"):
        _loader(state_lib.build_run(_midtrain_toy("/no/such/run")), "mid")
    config = _midtrain_toy(pretrained_toy)
    config.model.size = "125m"
    config.train.update(seq_len=512, global_batch=8)
    config.memory.check = False
    with pytest.raises(config_base.ConfigError, match="does not fit model.size='125m'") as error:
        _loader(state_lib.build_run(config), "mid")
    assert "\n" not in str(error.value)


def test_toy_step_at_16k_tokens_compiles_without_a_t_by_t_matrix():
    """Compiled, not run: the plan and the compiled memory are what is checked here;
    benchmarks/midtrain.py runs and times the step."""
    config = _midtrain_toy("", seq_len=16384, global_batch=1, steps=1, warmup_steps=1)
    config.model.max_positions = 16384
    config.mesh.update(fsdp=1)
    run = state_lib.build_run(config, jax.devices()[:1])
    assert run.model_cfg.attention_impl == "blockwise"  # no [T, T] matrix at this length
    batch = {key: jax.ShapeDtypeStruct((1, 16384), dtype, sharding=run.batch_sharding)
             for key, dtype in (("inputs", np.int32), ("targets", np.int32),
                                ("segment_ids", np.int32), ("positions", np.int32),
                                ("loss_mask", np.float32))}
    with jax.set_mesh(run.mesh), loop.logical_rules(run.rules):
        train_fn, _ = loop.compile_steps(run, evaluation.language_model_loss(run), None)
        compiled = train_fn.lower(run.abstract_state, batch, None).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    layer_logits = 4 * 16384 * 16384 * 4  # one layer's float32 [N, T, T] logits: 4 GiB
    assert temp < layer_logits / 2, temp  # no [N, T, T] logits: chunks of activations only
