"""Start-up (`build_run`) resolves `auto` attention and remat once, logs them, and runs the
attention numerics check only for fused kernels."""

import logging

import jax
import pytest

from phi4_jax import config_base
from phi4_jax.model.attention import check
from phi4_jax.train import memory
from phi4_jax.train import state as state_lib


def _config(**model):
    c = config_base.base_config()
    c.model.size = "toy"
    c.model.update(model)
    c.train.update(seq_len=128, global_batch=2, steps=2, warmup_steps=0, loss_chunk_tokens=32)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c


def _estimate_total(config, policy):
    model_cfg = config_base.validate_config(config).replace(
        remat_policy=policy, attention_impl="xla")
    t = config.train
    return memory.estimate_train_memory(
        model_cfg, seq_len=t.seq_len, per_device_batch=t.global_batch,
        mesh_shape=dict(data=1, fsdp=1, sequence=1, tensor=1), loss_chunk_tokens=t.loss_chunk_tokens).total


@pytest.mark.parametrize("fits", ["none", "save_dots", "save_qkv_proj", "full"])
def test_remat_auto_takes_the_cheapest_policy_that_fits(fits, caplog):
    config = _config(remat_policy="auto")
    config.memory.device_bytes = int(_estimate_total(config, fits) / memory.HEADROOM) + 1
    with caplog.at_level(logging.INFO):
        run = state_lib.build_run(config, jax.devices()[:1])
    assert run.model_cfg.remat_policy == fits
    assert f"remat {fits} (model.remat_policy=auto)" in caplog.text


def test_remat_auto_that_cannot_fit_is_refused_with_fixes():
    config = _config(remat_policy="auto")
    config.memory.device_bytes = int(_estimate_total(config, "full") / memory.HEADROOM) - 4096
    with pytest.raises(memory.MemoryBudgetError, match="remat full"):
        state_lib.build_run(config, jax.devices()[:1])


def test_auto_attention_is_resolved_once_and_logged(caplog):
    config = _config()
    config.train.seq_len = 2048
    config.model.max_positions = 2048
    with caplog.at_level(logging.INFO):
        run = state_lib.build_run(config, jax.devices()[:1])
    assert run.model_cfg.attention_impl == "blockwise"  # CPU, T > 2 blocks
    assert "Attention blockwise (model.attention_impl=auto)" in caplog.text


def test_plain_paths_skip_the_numerics_check(monkeypatch):
    monkeypatch.setattr(state_lib, "check_attention", lambda cfg: pytest.fail("checked"))
    state_lib.build_run(_config(attention_impl="blockwise"), jax.devices()[:1])


def test_fused_kernel_is_checked_before_anything_compiles():
    """On CPU the GPU kernel cannot run: refused at start-up, by name, with alternatives."""
    with pytest.raises(check.AttentionCheckError,
                       match="model.attention_impl='cudnn' failed .* needs an NVIDIA GPU.*"
                             "pallas_triton, tokamax, blockwise, xla"):
        state_lib.build_run(_config(attention_impl="cudnn"), jax.devices()[:1])
