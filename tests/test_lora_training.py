"""LoRA on the shared engine: DPO with the frozen backbone as its reference equals DPO with an
explicit reference copy; SFT from a checkpoint trains and saves adapters only and resumes
exactly; GRPO runs with its KL reference taken from the backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax import config_base, stages
from phi4_jax.losses.preference import dpo_losses, weighted_sums
from phi4_jax.model import lora
from phi4_jax.model.transformer import init_model
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.stages import dpo
from phi4_jax.stages.dpo import pair_log_probs
from phi4_jax.train import checkpoint, loop
from phi4_jax.train import state as state_lib
from phi4_jax.train.step import accumulated_gradients

from test_grpo import SHORT_SYSTEM
from test_post_training import _dpo_config, _random_pairs


def _lora(c, rank=4):
    c.lora.update(rank=rank, alpha=8.0, targets=("q", "v", "o", "down"))
    return c


def test_dpo_with_the_backbone_as_reference_equals_an_explicit_reference_copy():
    config = _lora(_dpo_config())
    run = state_lib.build_run(config, jax.devices()[:1], sequences_per_row=2)
    batch = _random_pairs()
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        adapters, backbone = lora.split(state_lib.init_params(run))
        adapters = jax.tree.map(lambda x: x + 0.02, adapters)  # a policy away from the backbone
        stage = dpo.build(config, run.model_cfg)
        assert stage.frozen.nbytes == 0  # no second copy: the backbone is the reference
        assert stage.frozen.load(lambda: 1 / 0) is None
        frozen = loop.step_frozen(run, backbone, None)
        loss_fn = loop._with_backbone(stage.loss(run))
        engine = jax.jit(lambda a, b, f: accumulated_gradients(a, b, f, loss_fn=loss_fn,
                                                                microbatches=1))(
            adapters, state_lib.to_global_batch(batch, run.batch_sharding), frozen)

    # The reference: a separate copy of the backbone's weights in a model without adapters.
    plain_cfg = run.model_cfg.replace(lora=None)
    plain = nnx.graphdef(nnx.eval_shape(lambda: init_model(plain_cfg)))
    reference_copy = jax.tree.map(lambda x: jnp.asarray(np.array(x)), backbone)
    score = dict(chunk_tokens=config.train.loss_chunk_tokens, pair_format="sequence",
                 length_normalize=False)
    ref = pair_log_probs(reference_copy, batch, graphdef=plain, **score)

    def explicit(a):
        policy = pair_log_probs(lora.join(a, backbone), batch, graphdef=run.graphdef, **score)
        losses, metrics = dpo_losses(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                     beta=config.dpo.beta, variant=config.dpo.variant)
        total, units, _ = weighted_sums(losses, metrics, batch["weight"],
                                        np.ones_like(batch["weight"]))
        return total / units

    loss, grads = jax.jit(jax.value_and_grad(explicit))(adapters)
    np.testing.assert_allclose(engine[0], loss, rtol=1e-5)
    assert float(loss) != float(np.log(2.0))  # the policy differs from its reference
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 engine[3], grads)


def _sft_config(steps, init_from=""):
    c = _lora(config_base.load_config("configs/sft.py", "toy"))
    c.train.update(steps=steps, warmup_steps=1, seq_len=64, global_batch=8, lr=1e-2)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=steps, batches=1, accuracy_problems=0, at_start=False)
    c.checkpoint.update(every_steps=1)
    c.init_from = init_from
    return c


@pytest.mark.slow
def test_sft_trains_and_saves_only_adapters_and_resumes_exactly(tmp_path, pretrained_toy):
    init = str(pretrained_toy)  # a full-weight checkpoint to adapt
    straight = stages.run(_sft_config(2, init), str(tmp_path / "straight"))
    first = stages.run(_sft_config(2, init), str(tmp_path / "resumed"), stop_at_step=1)
    second = stages.run(_sft_config(2, init), str(tmp_path / "resumed"))
    losses = [[h["loss"] for h in history if "loss" in h] for history in (first, second, straight)]
    np.testing.assert_allclose(losses[0] + losses[1], losses[2], rtol=1e-6)
    saved = checkpoint.saved_param_shapes(tmp_path / "straight" / "checkpoints" / "2")
    assert saved and all("adapters" in path for path in saved)
    assert len(saved) == 2 * 4  # a and b of q, v, o, down


@pytest.mark.slow
def test_grpo_runs_with_the_backbone_as_its_kl_reference(tmp_path):
    c = _lora(config_base.load_config("configs/grpo.py", "toy"))
    c.reasoning.system = SHORT_SYSTEM
    c.train.update(steps=1, global_batch=8, seq_len=256)
    c.grpo.update(group_size=2, max_new_tokens=8)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=1, accuracy_problems=0, at_start=False)
    history = stages.run(c, str(tmp_path))
    trained = [h for h in history if "loss" in h]
    # on-policy with a fresh adapter the policy is the backbone: the KL term starts at zero
    assert len(trained) == 1 and np.isfinite(trained[0]["loss"])
    assert abs(trained[0]["kl"]) < 1e-6
