"""Start-up (`build_run`) resolves `auto` attention and remat once, logs them, and runs the
attention numerics check only for fused kernels."""

import logging
import re

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
    config = _config(remat_policy="auto", attention_impl="xla")  # auto: what fits
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


H200_USABLE = 141 * 2**30 * memory.HEADROOM


def _shape(seq_len, rows):
    return dict(seq_len=seq_len, per_device_batch=rows, microbatches=1, loss_chunk_tokens=1024,
                mesh_shape=dict(data=1, fsdp=1, sequence=1, tensor=1))


@pytest.mark.parametrize("budget", [None, H200_USABLE])
def test_auto_on_a_gpu_takes_a_float32_kernel_for_float32_configs(budget):
    cfg = config_base.validate_config(_config())  # tiny: float32 compute
    impl, reasons = state_lib.choose_attention(cfg, _shape(128, 2), budget, backend="gpu")
    assert impl == "xla"
    assert reasons[0] == "not cudnn: cudnn takes bfloat16 or float16 only, not float32"
    assert reasons[1].startswith("xla: the fastest here that takes float32")


def test_auto_on_a_gpu_takes_cudnn_for_bf16_when_it_fits():
    cfg = config_base.validate_config(_config(compute_dtype="bfloat16"))
    impl, reasons = state_lib.choose_attention(cfg, _shape(128, 2), H200_USABLE, backend="gpu")
    assert impl == "cudnn" and len(reasons) == 1 and "fits" in reasons[0]


def test_auto_on_an_h200_fits_14b_4l_at_16k_batch_4():
    """cuDNN's backward workspace with 32 segment slots (~81 GiB) puts it over the H200;
    auto rejects it, says why, and takes the fastest kernel whose estimate fits."""
    config = config_base.load_config("configs/pretrain.py", "14b-4l")
    config.model.remat_policy = "auto"
    cfg = config_base.validate_config(config)
    shape = _shape(16384, 4)
    impl, reasons = state_lib.choose_attention(cfg, shape, H200_USABLE, backend="gpu")
    chosen = memory.estimate_train_memory(cfg.replace(attention_impl=impl, remat_policy="full"),
                                          **shape)
    assert chosen.total <= H200_USABLE and impl != "cudnn"
    assert re.match(r"not cudnn: needs ~\d+\.\d GiB with remat full, over the 126\.9 GiB "
                    r"usable \(its backward workspace ~80\.6 GiB grows with "
                    r"data.max_segments_per_row=32\)", reasons[0])
    assert reasons[-1].startswith(f"{impl}: the fastest here that takes bfloat16 and fits")
    fewer = cfg.replace(max_segments_per_row=4)  # a packer bound of 4 documents per row fits
    assert state_lib.choose_attention(fewer, shape, H200_USABLE, backend="gpu")[0] == "cudnn"


def test_startup_on_a_simulated_gpu_logs_why_float32_skips_cudnn(monkeypatch, caplog):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = _config()
    config.memory.device_bytes = 141 * 2**30
    mesh = state_lib.make_mesh(dict(data=1, fsdp=1, sequence=1, tensor=1), jax.devices()[:1])
    with caplog.at_level(logging.INFO):
        cfg = state_lib.check_memory(config, config_base.validate_config(config), mesh)
    assert cfg.attention_impl == "xla"
    assert ("Attention auto -> xla:\n  not cudnn: cudnn takes bfloat16 or float16 only"
            in caplog.text)
