"""Language-model log-probabilities and the next-token loss: pure functions of arrays, float32.

The one-position shift lives in `shift_for_next_token` alone: position t of `inputs` predicts
`targets[t] = tokens[t + 1]`, and a mask over the tokens becomes a mask over the targets.
Every data builder (packing, chat, preference pairs) goes through it, so the losses below
take log-probabilities already aligned with their targets and never shift again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.parallel.sharding import constrain


def shift_for_next_token(tokens: np.ndarray, token_mask: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, target_mask) of one token sequence [..., T+1] -> [..., T] each.

    `token_mask[i]` says whether token i is trained on (e.g. assistant content); it becomes
    the mask of the position that predicts token i, one to its left.
    """
    tokens, token_mask = np.asarray(tokens), np.asarray(token_mask)
    return tokens[..., :-1], tokens[..., 1:], token_mask[..., 1:]


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position from logits, in float32."""
    log_probs = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets_BT[..., None], axis=-1)[..., 0]


def chunked_token_log_probs(x_BTD: jax.Array, head_DV: jax.Array, targets_BT: jax.Array, *,
                            chunk_tokens: int, remat: bool = True) -> jax.Array:
    """log p(target) per position from final hidden states and the LM head, in float32.

    A scan over chunks of `chunk_tokens` positions forms each chunk's float32 logits and
    keeps only log p(target). With `remat` each chunk is recomputed in the backward, so the
    loss's extra memory is one chunk's logits (B * chunk * V floats) instead of three copies
    of the whole; without it the backward reuses every chunk's saved logits (B * T * V
    floats) and skips the head's second forward matmul, where memory allows
    (`model.remat_policy` none; `train.memory` counts them). `head_DV` stays in its
    parameter dtype (cast per chunk), so its gradient accumulates in that dtype.
    """
    return _over_chunks(_picked_log_probs, x_BTD, head_DV, targets_BT, chunk_tokens, remat)


def chunked_token_log_probs_and_greedy(x_BTD: jax.Array, head_DV: jax.Array,
                                       targets_BT: jax.Array, *, chunk_tokens: int,
                                       remat: bool = True) -> tuple[jax.Array, jax.Array]:
    """`chunked_token_log_probs` and, per position, whether the target has the highest logit
    (greedy decoding would emit it), as multiple-choice evaluation asks; same memory."""
    def log_probs_and_greedy(logits_BCV, targets_BC):
        picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        return (picked_BC - jax.nn.logsumexp(logits_BCV, axis=-1),
                picked_BC >= jnp.max(logits_BCV, axis=-1))

    return _over_chunks(log_probs_and_greedy, x_BTD, head_DV, targets_BT, chunk_tokens, remat)


def _picked_log_probs(logits_BCV: jax.Array, targets_BC: jax.Array) -> jax.Array:
    picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    return picked_BC - jax.nn.logsumexp(logits_BCV, axis=-1)


def _over_chunks(score, x_BTD: jax.Array, head_DV: jax.Array, targets_BT: jax.Array,
                 chunk_tokens: int, remat: bool):
    """`score(logits_BCV, targets_BC)` (arrays [B, C]) over chunks of positions, each chunk's
    float32 logits formed, scored and (with `remat`) recomputed in the backward; results
    [B, T]."""
    b, t, d = x_BTD.shape
    chunk = max(1, min(chunk_tokens, t))
    pad = -t % chunk
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    x_NBCD = x_BTD.reshape(b, n, chunk, d).swapaxes(0, 1)
    targets_NBC = targets_BT.reshape(b, n, chunk).swapaxes(0, 1)

    def chunk_scores(x_BCD, targets_BC):
        logits_BCV = head_logits(x_BCD, head_DV)
        return score(constrain(logits_BCV, ("batch", "seq", "vocab")), targets_BC)

    if remat:
        chunk_scores = jax.checkpoint(chunk_scores)

    _, scores_NBC = jax.lax.scan(lambda _, xs: (None, chunk_scores(*xs)), None,
                                 (x_NBCD, targets_NBC))
    return jax.tree.map(lambda s: s.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], scores_NBC)


@jax.custom_vjp
def head_logits(x_BCD: jax.Array, head_DV: jax.Array) -> jax.Array:
    """float32 logits of hidden states in the compute dtype and the head cast to it.

    Its backward takes the logits' gradient in the compute dtype, as every other matmul of
    the model does, where differentiating the float32 output would run both of the head's
    gradient matmuls in float32 (on an H200 in bfloat16: TF32 kernels, a quarter of a
    14b-4l step, `benchmarks/RESULTS_gpu.md`). Both gradients accumulate in float32; the
    head's comes back in its parameter dtype. With float32 hidden states it is the plain
    einsum's gradient.
    """
    return jnp.einsum("bcd,dv->bcv", x_BCD, head_DV.astype(x_BCD.dtype),
                      preferred_element_type=jnp.float32)


def _head_logits_forward(x_BCD, head_DV):
    return head_logits(x_BCD, head_DV), (x_BCD, head_DV)


def _head_logits_backward(residuals, grad_BCV):
    x_BCD, head_DV = residuals
    grad_BCV = grad_BCV.astype(x_BCD.dtype)
    grad_x = jnp.einsum("bcv,dv->bcd", grad_BCV, head_DV.astype(x_BCD.dtype),
                        preferred_element_type=jnp.float32)
    grad_head = jnp.einsum("bcd,bcv->dv", x_BCD, grad_BCV, preferred_element_type=jnp.float32)
    return grad_x.astype(x_BCD.dtype), grad_head.astype(head_DV.dtype)


head_logits.defvjp(_head_logits_forward, _head_logits_backward)


def next_token_loss_sum(log_probs_BT: jax.Array, weights_BT: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
    """Summed weighted negative log-likelihood and summed weight; callers divide once at the
    end, so microbatches and hosts average over tokens, not over batches."""
    weights = weights_BT.astype(jnp.float32)
    return -jnp.sum(log_probs_BT * weights), jnp.sum(weights)


def sequence_log_probs(log_probs_BT: jax.Array, mask_BT: jax.Array, *,
                       length_normalized: bool = False) -> jax.Array:
    """log p(response) per row [B]: the masked sum of per-target log-probs.

    `length_normalized` divides by the number of masked targets (the mean log-prob per
    token), as IPO does; in a DPO loss this scales the log-ratios by 1/length, so the
    effective beta grows with response length relative to the summed form.
    """
    mask = mask_BT.astype(jnp.float32)
    total = jnp.sum(log_probs_BT * mask, axis=-1)
    return total / jnp.maximum(mask.sum(-1), 1.0) if length_normalized else total
