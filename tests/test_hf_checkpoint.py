"""Hugging Face interop checked against transformers' own `Phi3ForCausalLM`.

The reference is the upstream implementation: a tiny random Phi3ForCausalLM (grouped KV,
rope base 250K, partial rotary, tied embeddings) is saved with `save_pretrained`, imported, and
its float32 logits compared; the export is reloaded with `from_pretrained` and compared again.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.hf  # parity with transformers
torch = pytest.importorskip("torch", reason="torch is needed for the transformers reference")
transformers = pytest.importorskip("transformers",
                                   reason="transformers provides the Phi3ForCausalLM reference")
from safetensors.torch import load_file  # noqa: E402

from phi4_jax.interop import hf_checkpoint as hf  # noqa: E402
from phi4_jax.parallel import sharding  # noqa: E402
from phi4_jax.model.transformer import init_model  # noqa: E402
from phi4_jax.model.config import model_config_for  # noqa: E402

torch.set_num_threads(1)
TINY_HF = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=250_000.0,
               max_position_embeddings=128, original_max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)
TINY_TOKEN_IDS = hf.SpecialTokenIds(bos=1, eos=2, pad=3)
CASES = {
    "grouped_kv": {},
    "partial_rotary": {"partial_rotary_factor": 0.75},
    "tied": {"tie_word_embeddings": True},
}


def _hf_model(seed: int = 0, **overrides):
    """A random tiny Phi3ForCausalLM; norm scales random too, so a swapped norm shows."""
    config = transformers.Phi3Config(**{**TINY_HF, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.05 * noise)
    return model


def _token_ids(batch: int = 2, length: int = 24) -> np.ndarray:
    return np.random.default_rng(0).integers(0, TINY_HF["vocab_size"], (batch, length))


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _jax_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg))), params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(jnp.asarray(tokens), positions, jnp.ones_like(positions)))


def _assert_close(actual: np.ndarray, reference: np.ndarray) -> None:
    assert actual.shape == reference.shape
    err = np.max(np.abs(actual - reference))
    assert err <= 1e-4 * np.max(np.abs(reference)), (err, np.max(np.abs(reference)))


def _saved(model, tmp_path, name: str, **kwargs):
    directory = tmp_path / name
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sharded", [False, True], ids=["single_file", "sharded"])
def test_import_matches_transformers(case, sharded, tmp_path):
    model = _hf_model(**CASES[case])
    directory = _saved(model, tmp_path, "hf", **({"max_shard_size": "100KB"} if sharded else {}))
    assert (directory / hf.INDEX_FILE).is_file() == sharded
    cfg = hf.model_config_from_hf(directory)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.rope_theta) == (3, 2, 250_000.0)
    assert cfg.rotary_fraction == CASES[case].get("partial_rotary_factor", 1.0)
    assert cfg.tie_embeddings == CASES[case].get("tie_word_embeddings", False)
    tokens = _token_ids()
    _assert_close(_jax_logits(cfg, hf.load_hf_checkpoint(directory, cfg), tokens),
                  _hf_logits(model, tokens))


@pytest.mark.parametrize("scan_unroll", [1, 2, 3], ids=["rolled", "two_per_step", "unrolled"])
def test_layer_loop_unrolling_keeps_logits_and_gradients_of_transformers(scan_unroll, tmp_path):
    """3 layers rolled, 2 per iteration (a remainder of one), and no loop at all: logits and
    the embedding's gradient (which every layer's backward reaches) against torch's."""
    model = _hf_model(seed=2)
    directory = _saved(model, tmp_path, "hf")
    cfg = hf.model_config_from_hf(directory).replace(scan_unroll=scan_unroll)
    params = hf.load_hf_checkpoint(directory, cfg)
    tokens = _token_ids(length=16)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    logits = model(torch.from_numpy(inputs)).logits.float()
    torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(targets)[..., None]).sum().backward()
    reference = model.model.embed_tokens.weight.grad.numpy()

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)

    def log_likelihood(params):
        out = nnx.merge(graphdef, params)(jnp.asarray(inputs), positions,
                                          jnp.ones_like(positions))
        log_probs = jax.nn.log_softmax(out, -1)
        return jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], -1).sum(), out

    grads, jax_logits = jax.grad(log_likelihood, has_aux=True)(params)
    _assert_close(np.asarray(jax_logits), logits.detach().numpy())
    _assert_close(np.asarray(grads["embed_VD"][...]), reference)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_reloads_in_transformers(case, tmp_path):
    model = _hf_model(seed=1, **CASES[case])
    cfg = hf.model_config_from_hf(model.config.to_dict())
    params = hf.load_hf_checkpoint(_saved(model, tmp_path, "hf"), cfg)
    out = hf.save_hf_checkpoint(params, cfg, tmp_path / "export", dtype="float32",
                                max_shard_bytes=60_000, token_ids=TINY_TOKEN_IDS)
    assert (out / hf.INDEX_FILE).is_file()
    reloaded = transformers.Phi3ForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    original = model.state_dict()
    for name, tensor in reloaded.state_dict().items():  # float32 export is lossless
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)
    tokens = _token_ids(length=20)
    _assert_close(_hf_logits(reloaded, tokens), _jax_logits(cfg, params, tokens))
    assert reloaded.config.rope_parameters["rope_theta"] == 250_000.0
    assert reloaded.config.tie_word_embeddings == cfg.tie_embeddings


def test_shards_respect_the_limit_and_the_index_lists_each_tensor_once(tmp_path):
    cfg = model_config_for("tiny", vocab_size=512, num_layers=3)
    limit = 100_000
    out = hf.save_hf_checkpoint(init_model(cfg), cfg, tmp_path / "x", dtype="float32",
                                max_shard_bytes=limit, token_ids=TINY_TOKEN_IDS)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    shards = {file: load_file(out / file) for file in set(index["weight_map"].values())}
    assert len(shards) > 2 and not (out / hf.SINGLE_FILE).exists()
    named = [(name, file) for file, tensors in shards.items() for name in tensors]
    assert sorted(named) == sorted(index["weight_map"].items())
    for tensors in shards.values():  # only a lone tensor may exceed the limit
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= limit
    total = sum(t.numel() * 4 for tensors in shards.values() for t in tensors.values())
    assert index["metadata"]["total_size"] == total


def test_bfloat16_round_trip_rounds_like_torch(tmp_path):
    model = _hf_model(seed=2)
    bf16_dir = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16_dir)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = hf.model_config_from_hf(bf16_dir)
    as_f32 = hf.load_hf_checkpoint(bf16_dir, cfg)
    as_bf16 = hf.load_hf_checkpoint(bf16_dir, cfg, dtype="bfloat16")
    qkv = expected["model.layers.1.self_attn.qkv_proj.weight"].float().numpy()
    q_DNH = qkv[: cfg.num_heads * cfg.head_dim].T.reshape(cfg.d_model, cfg.num_heads, cfg.head_dim)
    np.testing.assert_array_equal(np.asarray(as_f32["blocks"]["attn"]["q_DNH"][...][1]), q_DNH)
    assert as_bf16["blocks"]["attn"]["q_DNH"][...].dtype == jnp.bfloat16
    out = hf.save_hf_checkpoint(as_f32, cfg, tmp_path / "export", token_ids=TINY_TOKEN_IDS)
    saved = load_file(out / hf.SINGLE_FILE)
    assert set(saved) == set(expected)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    # float32 values round to bfloat16 as torch rounds them (nearest, ties to even)
    f32_dir = tmp_path / "f32"
    _hf_model(seed=3).save_pretrained(f32_dir)
    out = hf.save_hf_checkpoint(hf.load_hf_checkpoint(f32_dir, cfg), cfg, tmp_path / "rounded",
                                token_ids=TINY_TOKEN_IDS)
    reference = load_file(f32_dir / hf.SINGLE_FILE)
    for name, tensor in load_file(out / hf.SINGLE_FILE).items():
        torch.testing.assert_close(tensor, reference[name].bfloat16(), rtol=0, atol=0, msg=name)


def test_load_places_parameters_with_the_given_shardings(tmp_path):
    directory = _saved(_hf_model(), tmp_path, "hf")
    cfg = hf.model_config_from_hf(directory)
    abstract = nnx.state(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1})
    shardings = sharding.state_shardings(abstract, mesh, (("embed", "fsdp"), ("mlp", "tensor")))
    params = hf.load_hf_checkpoint(directory, cfg, shardings=shardings)
    for (path, var), (_, want) in zip(nnx.to_flat_state(params), nnx.to_flat_state(shardings)):
        assert var[...].sharding == want.get_value(), path
    with pytest.raises(hf.HFCheckpointError, match="one entry per model parameter"):
        partial = nnx.State({"embed_VD": shardings["embed_VD"]})
        hf.load_hf_checkpoint(directory, cfg, shardings=partial)


def test_checkpoint_is_found_from_its_directory_index_or_file(tmp_path):
    sharded = _saved(_hf_model(), tmp_path, "sharded", max_shard_size="100KB")
    single = _saved(_hf_model(), tmp_path, "single")
    assert hf.checkpoint_files(sharded) == hf.checkpoint_files(sharded / hf.INDEX_FILE)
    assert len(hf.checkpoint_files(sharded)) > 1
    assert hf.checkpoint_files(single) == [single / hf.SINGLE_FILE]
    assert hf.checkpoint_files(single / hf.SINGLE_FILE) == [single / hf.SINGLE_FILE]
    (sharded / sorted(sharded.glob("model-*.safetensors"))[-1].name).unlink()
    with pytest.raises(hf.HFCheckpointError, match="lists shard files that do not exist"):
        hf.checkpoint_files(sharded)


def _mismatch_message(directory, cfg, monkeypatch) -> str:
    """The error for a mismatched config; reading any tensor data first would fail the test."""
    monkeypatch.setattr(hf, "_read_parameter", lambda *a: pytest.fail("read before validating"))
    with pytest.raises(hf.HFCheckpointError) as error:
        hf.load_hf_checkpoint(directory, cfg)
    return str(error.value)


def test_too_few_layers_names_the_first_unexpected_tensor(tmp_path, monkeypatch):
    directory = _saved(_hf_model(), tmp_path, "hf", max_shard_size="100KB")
    cfg = hf.model_config_from_hf(directory, num_layers=2)
    message = _mismatch_message(directory, cfg, monkeypatch)
    assert "unexpected tensor model.layers.2.input_layernorm.weight [64]" in message
    assert "num_layers=2" in message and "3 layers" in message and "6 unexpected" in message


def test_too_many_layers_names_the_first_missing_tensor(tmp_path, monkeypatch):
    directory = _saved(_hf_model(), tmp_path, "hf")
    cfg = hf.model_config_from_hf(directory, num_layers=4)
    message = _mismatch_message(directory, cfg, monkeypatch)
    assert "missing tensor model.layers.3.input_layernorm.weight (expected shape [64])" in message
    assert "6 missing" in message


def test_wrong_hidden_size_names_the_embedding(tmp_path, monkeypatch):
    directory = _saved(_hf_model(), tmp_path, "hf")
    cfg = hf.model_config_from_hf(directory, d_model=32)
    message = _mismatch_message(directory, cfg, monkeypatch)
    assert "tensor model.embed_tokens.weight has shape [512, 64], expected [512, 32]" in message
    assert "hidden size 64" in message


def test_named_size_mismatch_names_the_size(tmp_path, monkeypatch):
    directory = _saved(_hf_model(), tmp_path, "hf")
    cfg = model_config_for("tiny", vocab_size=512, num_layers=3)  # ffn_dim 192, checkpoint 128
    message = _mismatch_message(directory, cfg, monkeypatch)
    assert "model config 'tiny'" in message
    assert ("tensor model.layers.0.mlp.gate_up_proj.weight has shape [256, 64], "
            "expected [384, 64]") in message


def test_tied_checkpoint_into_untied_config_reports_missing_lm_head(tmp_path, monkeypatch):
    directory = _saved(_hf_model(tie_word_embeddings=True), tmp_path, "hf")
    cfg = hf.model_config_from_hf(directory, tie_embeddings=False)
    message = _mismatch_message(directory, cfg, monkeypatch)
    assert "missing tensor lm_head.weight (expected shape [512, 64])" in message


def test_layout_covers_every_model_parameter_exactly_once():
    for cfg in (model_config_for("tiny"), model_config_for("phi4-mini")):
        blocks = [(b.path, t.layer) for t in hf._hf_tensors(cfg) for b in t.blocks]
        assert len(blocks) == len(set(blocks))
        stacked = {p: s[0] for p, s in hf._param_shapes(cfg).items() if p[0] == "blocks"}
        expected = {(p, layer) for p, n in stacked.items() for layer in range(n)}
        expected |= {(p, None) for p in hf._param_shapes(cfg) if p not in stacked}
        assert set(blocks) == expected


def test_phi4_14b_tensor_shapes_match_the_release():
    shapes = {t.name: t.shape for t in hf._hf_tensors(model_config_for("phi4-14b"))}
    assert len(shapes) == 40 * 6 + 3
    assert shapes["model.embed_tokens.weight"] == (100352, 5120)
    assert shapes["model.layers.39.self_attn.qkv_proj.weight"] == ((40 + 2 * 10) * 128, 5120)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (5120, 5120)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 17920, 5120)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (5120, 17920)
    assert shapes["lm_head.weight"] == (100352, 5120)


def test_released_phi4_config_gives_the_phi4_14b_geometry():
    released = {  # microsoft/phi-4 config.json, pre-transformers-5 rope keys
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False,
        "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 17920,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
        "max_position_embeddings": 16384, "original_max_position_embeddings": 16384,
        "rope_theta": 250000, "rope_scaling": None, "rms_norm_eps": 1e-05,
        "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 100352,
        "bos_token_id": 100257, "eos_token_id": 100265, "pad_token_id": 100349}
    ours = hf.model_config_from_hf(released, param_dtype="bfloat16")
    assert ours == model_config_for("phi4-14b", param_dtype="bfloat16").replace(name="hf")


@pytest.mark.parametrize("size", ["phi4-14b", "phi4-mini", "tiny"])
def test_written_config_is_read_back_by_transformers_and_by_us(size):
    cfg = model_config_for(size)
    token_ids = hf.PHI4_TOKEN_IDS if cfg.vocab_size == 100352 else hf.SpecialTokenIds(0, 1, None)
    written = hf.hf_config_dict(cfg, token_ids)
    theirs = transformers.Phi3Config.from_dict(written)
    assert (theirs.hidden_size // theirs.num_attention_heads, theirs.num_key_value_heads,
            theirs.rope_parameters["rope_theta"], theirs.rope_parameters["partial_rotary_factor"],
            theirs.tie_word_embeddings) == (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta,
                                            cfg.rotary_fraction, cfg.tie_embeddings)
    assert hf.model_config_from_hf(theirs.to_dict()) == cfg.replace(name="hf")
    assert hf.model_config_from_hf(written) == cfg.replace(name="hf")


def test_phi4_special_token_ids_are_the_release_roles():
    assert hf.PHI4_TOKEN_IDS == hf.SpecialTokenIds(bos=100257, eos=100265, pad=100349)


@pytest.mark.parametrize("change, named", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 64}, "sliding_window"),
    ({"model_type": "llama"}, "model_type"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_hf_configs_are_refused_by_name(change, named):
    config = hf.hf_config_dict(model_config_for("tiny"), hf.PHI4_TOKEN_IDS)
    config.pop("rope_parameters")
    with pytest.raises(hf.HFCheckpointError, match=named):
        hf.model_config_from_hf({**config, **change})


def test_missing_geometry_key_is_named():
    config = hf.hf_config_dict(model_config_for("tiny"), hf.PHI4_TOKEN_IDS)
    del config["intermediate_size"]
    with pytest.raises(hf.HFCheckpointError, match="intermediate_size"):
        hf.model_config_from_hf(config)


def test_bad_save_arguments_are_refused(tmp_path):
    cfg = model_config_for("tiny", vocab_size=512, num_layers=1)
    model = init_model(cfg)
    with pytest.raises(hf.HFCheckpointError, match="special-token ids for vocab_size=512"):
        hf.save_hf_checkpoint(model, cfg, tmp_path / "a")
    with pytest.raises(hf.HFCheckpointError, match="bos_token_id=100257"):
        hf.save_hf_checkpoint(model, cfg, tmp_path / "a", token_ids=hf.PHI4_TOKEN_IDS)
    with pytest.raises(hf.HFCheckpointError, match="dtype='int8'"):
        hf.save_hf_checkpoint(model, cfg, tmp_path / "a", dtype="int8", token_ids=TINY_TOKEN_IDS)
    wrong_shape = r"blocks/mlp/down_FD is \(1, 192, 64\), expected \(1, 64, 64\)"
    with pytest.raises(hf.HFCheckpointError, match=wrong_shape):
        hf.save_hf_checkpoint(model, cfg.replace(ffn_dim=64), tmp_path / "a",
                              token_ids=TINY_TOKEN_IDS)
    hf.save_hf_checkpoint(model, cfg, tmp_path / "a", token_ids=TINY_TOKEN_IDS)
    with pytest.raises(hf.HFCheckpointError, match="already holds a checkpoint"):
        hf.save_hf_checkpoint(model, cfg, tmp_path / "a", token_ids=TINY_TOKEN_IDS)
    with pytest.raises(hf.HFCheckpointError, match="no checkpoint at"):
        hf.load_hf_checkpoint(tmp_path / "missing", cfg)
