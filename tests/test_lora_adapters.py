"""Per-row LoRA adapters read from the data: each row's update against float64 NumPy, the
backbone's own output for id -1, gradients only into a row's own adapter, ids carried from
records through packing into SFT, DPO and GRPO rows and the sampler, the one-line refusals,
and a two-adapter SFT run whose adapters each changed only their own rows (and export merges
either)."""

import functools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax import config_base, export, stages
from phi4_jax.data import adapters, chat, pipeline, preference, problems
from phi4_jax.data.sources import JsonRecord
from phi4_jax.data.synthetic import reasoning
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.model import lora
from phi4_jax.model.config import model_config_for
from phi4_jax.model.transformer import init_model
from phi4_jax.sampling import decode

PLAIN = model_config_for("tiny", vocab_size=97, num_layers=2)
LORA = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "down"), adapters=("math", "code"))
ADAPTED = PLAIN.replace(lora=LORA)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 10)))
POSITIONS = jnp.broadcast_to(jnp.arange(10), TOKENS.shape)
SEGMENTS = jnp.ones_like(TOKENS)
BYTES = load_tokenizer("bytes")


def _logits(cfg, params, adapter_ids=None):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))
    return _forward(graphdef, params, adapter_ids)


@jax.jit
def _forward(graphdef, params, adapter_ids):
    return nnx.merge(graphdef, params)(TOKENS, POSITIONS, SEGMENTS, adapter_ids)


@functools.cache
def _moved_adapters(seed=1):
    """Adapters with B drawn too (a fresh B is zero), as after some training, and the backbone."""
    adapters_, backbone = lora.split(nnx.to_pure_dict(nnx.state(init_model(ADAPTED))))
    leaves, tree = jax.tree.flatten(adapters_)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves), backbone


# --- (a) the forward ------------------------------------------------------------------------

def test_mixed_rows_against_float64_and_the_backbone_exactly():
    """q (d -> n h): x W + alpha/rank (x A_k) B_k for a row with id k; an id -1 row is x W
    to the bit."""
    rng = np.random.default_rng(3)
    adapter = lora.Adapter("q", ADAPTED, nnx.Rngs(params=0))
    adapter.b[...] = jnp.asarray(rng.normal(size=adapter.b.shape), jnp.float32)
    x = rng.normal(size=(4, 5, PLAIN.d_model)).astype(np.float32)
    w = rng.normal(size=(PLAIN.d_model, PLAIN.num_heads, PLAIN.head_dim)).astype(np.float32)
    ids = np.asarray([1, -1, 0, 1])
    actual = np.asarray(lora.project(jnp.asarray(x), nnx.Param(jnp.asarray(w)), "btd,dnh->btnh",
                                     {"q": adapter}, "q", jnp.asarray(ids)))
    a, b = np.asarray(adapter.a[...], np.float64), np.asarray(adapter.b[...], np.float64)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    for row, k in enumerate(ids):
        expected = np.einsum("td,dnh->tnh", x64[row], w64)
        if k >= 0:
            expected += LORA.scale * np.einsum("td,dr,rnh->tnh", x64[row], a[k], b[k])
        np.testing.assert_allclose(actual[row], expected, rtol=1e-4, atol=1e-3)
    backbone_only = np.asarray(jnp.einsum("btd,dnh->btnh", jnp.asarray(x), jnp.asarray(w)))
    np.testing.assert_array_equal(actual[1], backbone_only[1])


def test_whole_model_rows_with_id_minus_one_are_the_backbone():
    moved, backbone = _moved_adapters()
    ids = jnp.asarray([0, -1, 1, -1])
    adapted = np.asarray(_logits(ADAPTED, lora.join(moved, backbone), ids))
    plain = np.asarray(_logits(PLAIN, backbone))
    np.testing.assert_array_equal(adapted[[1, 3]], plain[[1, 3]])
    assert np.abs(adapted[[0, 2]] - plain[[0, 2]]).min(axis=-1).max() > 0  # adapters act


# --- (b) gradients --------------------------------------------------------------------------

def test_a_rows_loss_reaches_only_its_own_adapter():
    """A loss on the id-0 rows: zero gradient for adapter 1 (at every layer and target),
    nonzero for adapter 0; rows 1 (id 1) and 3 (id -1) are in the batch but out of the loss."""
    moved, backbone = _moved_adapters()
    ids = jnp.asarray([0, 1, 0, -1])
    weight = jnp.asarray([1.0, 0.0, 1.0, 0.0])[:, None, None]

    def loss(a):
        return jnp.sum(weight * _logits(ADAPTED, lora.join(a, backbone), ids) ** 2)

    grads = jax.tree_util.tree_flatten_with_path(jax.grad(loss)(moved))[0]
    assert len(grads) == 2 * len(LORA.targets)
    for path, g in grads:  # [L, J, ...]: layers first, then the adapters
        g = np.asarray(g)
        assert np.all(g[:, 1] == 0), path
        assert np.all(np.abs(g[:, 0]).reshape(g.shape[0], -1).max(-1) > 0), path


# --- records -> rows ------------------------------------------------------------------------

def _chat(adapter=None, where="chat.jsonl:3", reply="Hello!"):
    record = JsonRecord({"messages": [{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": reply}],
                         **({} if adapter is None else {"adapter": adapter})})
    record.where = where
    return record


def _sft(record, routing):
    return chat.sft_example(record, tokenizer=BYTES, seq_len=64, truncation="truncate",
                            counts=chat.Counts(), routing=routing)


def test_rows_carry_their_records_adapter_through_packing():
    one_per_row = adapters.Routing(("math", "code"))
    examples = [_sft(_chat(k, reply="x" * (3 + i)), one_per_row)
                for i, k in enumerate([1, -1, None, 0, 1])]
    rows = list(chat.pack_examples(grain.MapDataset.source(examples).to_iter_dataset(), 64, 1,
                                   with_adapter_ids=True))
    # one record per row; the first-fit packer emits them in its own order: match by length
    by_length = {int(r["segment_ids"].sum()): int(r["adapter_ids"]) for r in rows}
    assert by_length == {len(e["inputs"]): int(e["adapter_ids"][0]) for e in examples}
    assert sorted(by_length.values()) == [-1, 0, 0, 1, 1]  # no field: adapter 0
    assert all(r["adapter_ids"].dtype == np.int32 and r["adapter_ids"].shape == () for r in rows)
    # records without the field pack several to a row, all on adapter 0
    packed = adapters.Routing(("math", "code"), packed=True)
    examples = [_sft(_chat(), packed) for _ in range(4)]
    rows = list(chat.pack_examples(grain.MapDataset.source(examples).to_iter_dataset(), 64, 4,
                                   with_adapter_ids=True))
    assert len(rows) < 4 and all(int(r["adapter_ids"]) == 0 for r in rows)
    # without LoRA rows hold no ids, as before
    assert "adapter_ids" not in _sft(_chat(), adapters.Routing(()))


def test_preference_and_problem_rows_carry_the_adapter():
    routing = adapters.Routing(("math", "code"))
    pair = JsonRecord({"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "adapter": 1})
    rows = preference.pair_example(pair, tokenizer=BYTES, pair_format="sequence", judged=False,
                                   weighting=preference.JudgeWeighting(), seq_len=64,
                                   counts=chat.Counts(), routing=routing)
    assert rows["inputs"].shape == (2, 64) and int(rows["adapter_ids"]) == 1
    problem = JsonRecord({"question": "1+1?", "answer": "2", "adapter": -1})
    row = problems.problem_row(problem, tokenizer=BYTES, fmt=reasoning.ReasoningFormat(),
                               prompt_len=256, counts=chat.Counts(), routing=routing)
    assert int(row["adapter_ids"]) == -1


# --- (d) the refusals -----------------------------------------------------------------------

@pytest.mark.parametrize("value, routing, message", [
    (2, adapters.Routing(("math", "code")),
     r"^chat.jsonl:3: field 'adapter'=2 is not an index into lora.adapters=\('math', 'code'\); "
     r"give an integer in \[-1, 2\)"),
    (-2, adapters.Routing(("math", "code")), r"'adapter'=-2 is not an index"),
    ("code", adapters.Routing(("math", "code")), r"'adapter'='code' is not an index"),
    (True, adapters.Routing(("math", "code")), r"'adapter'=True is not an index"),
    (0, adapters.Routing(()), r"^chat.jsonl:3: field 'adapter'=0, but lora.rank=0 trains no "
                              r"adapters; set --config.lora.rank"),
    (1, adapters.Routing(("math", "code"), packed=True),
     r"packed rows would mix adapters; set --config.data.max_segments_per_row=1")])
def test_a_record_the_run_cannot_route_is_refused_in_one_line(value, routing, message):
    with pytest.raises(adapters.AdapterFieldError, match=message) as error:
        _sft(_chat(value), routing)
    assert "\n" not in str(error.value)


def test_a_bad_id_stops_the_run_at_start_up_and_is_not_skipped(tmp_path):
    """Read by the start-up preflight, under the default 'skip' bad-record policy."""
    lines = [{"messages": _chat()["messages"]}] * 3 + [{**_chat(), "adapter": 5}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = pipeline.checked_data_config({
        **pipeline.DATA_DEFAULTS, "mix": {"chat": 1.0}, "max_segments_per_row": 1,
        "eval_holdout": 0.0,
        "sources": {"chat": config_base.source_spec("jsonl", paths=str(tmp_path / "*.jsonl")
                                                   ).to_dict()}})
    records = pipeline.shard_records("chat", cfg, split="train", process_index=0,
                                     process_count=1)
    with pytest.raises(adapters.AdapterFieldError, match=r"chat.jsonl:4: field 'adapter'=5"):
        chat.conversation_rows("chat", records, cfg, tokenizer=BYTES, seq_len=64,
                               truncation="drop", counts=chat.Counts(), reasoning_format=None,
                               adapter_names=LORA.adapters)


def test_pivotal_token_search_refuses_adapters_in_one_line():
    """Its shared-prefix sampler routes no adapters: merge one first."""
    from phi4_jax.search import job  # noqa: PLC0415

    config = config_base.load_config("configs/pts_search.py", "toy")
    config.init_from = "/some/run"
    config.lora.rank = 4
    with pytest.raises(config_base.ConfigError,
                       match=r"^lora.rank=4: Pivotal Token Search runs one whole model and "
                             r"routes no adapters; merge the adapter \(python -m "
                             r"phi4_jax.export --adapter=NAME\)"):
        job.check(config, config_base.validate_config(config))


# --- sampling -------------------------------------------------------------------------------

def test_generation_follows_each_rows_adapter():
    """A row decoded among rows of other adapters emits what it emits alone on its adapter."""
    moved, backbone = _moved_adapters(seed=2)
    params = lora.join(moved, backbone)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(ADAPTED)))
    sampling = decode.SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts = [[5, 6, 7], [5, 6, 7], [5, 6, 7]]
    prompt = decode.left_pad(prompts)
    keys = decode.row_keys(0, range(3))
    generate = decode.compiled_generate(graphdef, ADAPTED, sampling)
    mixed = generate(params, {**prompt, "adapter_ids": np.asarray([0, 1, -1])}, keys).tokens
    for row, k in enumerate([0, 1, -1]):
        alone = generate(params, {**prompt, "adapter_ids": np.full(3, k)}, keys).tokens
        np.testing.assert_array_equal(mixed[row], alone[row])
    plain_graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(PLAIN)))
    backbone_tokens = decode.compiled_generate(plain_graphdef, PLAIN, sampling)(
        backbone, prompt, keys).tokens
    np.testing.assert_array_equal(mixed[2], backbone_tokens[2])


# --- (c) two adapters trained in one run ----------------------------------------------------

def _two_adapter_sft(tmp_path, init_from):
    """Three steps of LoRA SFT on records split over adapters 'a' (0), 'b' (1) and none (-1),
    each teaching its own reply, one record per row."""
    replies = {0: "alpha alpha", 1: "beta beta", -1: "gamma gamma"}
    lines = [{"messages": [{"role": "user", "content": f"Say {i}"},
                           {"role": "assistant", "content": replies[k]}], "adapter": k}
             for i in range(8) for k in replies]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    c = config_base.load_config("configs/sft.py", "toy")
    c.data.sources.chat = config_base.source_spec("jsonl", paths=str(tmp_path / "chat.jsonl"))
    c.data.mix.refusal = 0.0
    c.data.update(max_segments_per_row=1, eval_holdout=0.0)
    c.lora.update(rank=4, alpha=8.0, targets=("q", "v", "o", "down"), adapters=("a", "b"))
    c.train.update(steps=3, warmup_steps=1, seq_len=64, global_batch=8, lr=1e-2)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=3, batches=1, accuracy_problems=0, at_start=False)
    c.checkpoint.every_steps = 3
    c.init_from = init_from
    workdir = tmp_path / "run"
    stages.run(c, str(workdir))
    return workdir


def _without(adapters_, j):
    """The adapters with adapter j back at its initial update, zero (B = 0)."""
    return jax.tree.map(lambda x: x.at[:, j].set(0), adapters_)


@pytest.mark.slow
def test_each_adapter_changed_only_its_own_rows(tmp_path, pretrained_toy):
    from phi4_jax.train import initial_params  # noqa: PLC0415 (as export reads a step)

    workdir = _two_adapter_sft(tmp_path, str(pretrained_toy))
    plan = export.plan(str(workdir), str(tmp_path / "unused"), adapter="a")
    cfg = plan.model_cfg
    adapters_abstract, backbone_abstract = export._abstract_params(cfg)
    trained = initial_params.load(initial_params.InitialCheckpoint("phi4", plan.step_dir),
                                  adapters_abstract, cfg)
    backbone = initial_params.load(plan.backbone, backbone_abstract, cfg)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (6, 12)))
    ids = jnp.asarray([0, 0, 1, 1, -1, -1])
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))
    plain = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg.replace(lora=None))))

    def logits(graph, params, adapter_ids=None):
        positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
        return np.asarray(jax.jit(lambda p, a: nnx.merge(graph, p)(
            tokens, positions, jnp.ones_like(tokens), a))(params, adapter_ids))

    both = logits(graphdef, lora.join(trained, backbone), ids)
    only_a = logits(graphdef, lora.join(_without(trained, 1), backbone), ids)
    only_b = logits(graphdef, lora.join(_without(trained, 0), backbone), ids)
    base = logits(plain, backbone)
    np.testing.assert_array_equal(both[:2], only_a[:2])  # 'b' trained or not: same 'a' rows
    np.testing.assert_array_equal(both[2:4], only_b[2:4])  # and the other way round
    np.testing.assert_array_equal(both[4:], base[4:])  # -1 rows: the frozen backbone
    for rows in (slice(0, 2), slice(2, 4)):  # both adapters trained and moved their rows
        assert np.abs(both[rows] - base[rows]).max() > 1e-3
    for name, rows in (("a", slice(0, 2)), ("b", slice(2, 4))):  # export merges either
        merged = export.exported_params(export.plan(str(workdir), str(tmp_path / name),
                                                    adapter=name))
        np.testing.assert_allclose(logits(plain, merged)[rows], both[rows], rtol=1e-4,
                                   atol=1e-4)


def test_both_sides_of_a_pair_use_the_pairs_adapter():
    """DPO's [B, 2, T] rows flatten to [2B, T]: chosen and rejected of pair b on its adapter."""
    from phi4_jax.stages.dpo import pair_log_probs  # noqa: PLC0415

    moved, backbone = _moved_adapters()
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 97, (3, 2, 9)).astype(np.int32)
    pairs = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (3, 2, 8)),
             "segment_ids": np.ones((3, 2, 8), np.int32),
             "loss_mask": np.ones((3, 2, 8), np.float32)}
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(ADAPTED)))
    score = jax.jit(functools.partial(pair_log_probs, graphdef=graphdef, chunk_tokens=8,
                                      pair_format="sequence", length_normalize=False))
    params = lora.join(moved, backbone)
    ids = [0, 1, -1]
    mixed = np.asarray(score(params, {**pairs, "adapter_ids": np.asarray(ids, np.int32)}))
    alone = [np.asarray(score(params, {**pairs, "adapter_ids": np.full(3, k, np.int32)}))
             for k in ids]
    for b in range(3):
        np.testing.assert_allclose(mixed[b], alone[b][b], rtol=1e-6)
    assert np.abs(alone[0] - alone[1]).min() > 0 and np.abs(alone[0] - alone[2]).min() > 0


@pytest.mark.slow
def test_grpo_samples_and_trains_problems_on_their_adapters(tmp_path, monkeypatch):
    """A GRPO step over problems split across 'a', 'b' and none: each group's rows carry its
    problem's id; with fresh adapters every policy is the backbone, so the KL is zero."""
    from test_grpo import SHORT_SYSTEM  # noqa: PLC0415
    from phi4_jax.stages import grpo  # noqa: PLC0415

    laid_out, prepare_batch = [], grpo.prepare_batch

    def recorded(run, batch, params, step):
        questions = [str(q) for q in batch["question"]]
        rows, metrics = prepare_batch(run, batch, params, step)
        laid_out.append((questions, rows["adapter_ids"]))
        return rows, metrics

    monkeypatch.setattr(grpo, "prepare_batch", recorded)

    lines = [{"question": f"What is {i} + 2?", "answer": str(i + 2), "adapter": i % 3 - 1}
             for i in range(8)]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    c = config_base.load_config("configs/grpo.py", "toy")
    c.data.sources.problems = config_base.source_spec("jsonl",
                                                      paths=str(tmp_path / "problems.jsonl"))
    c.data.eval_holdout = 0.0
    c.lora.update(rank=4, alpha=8.0, targets=("q", "v"), adapters=("a", "b"))
    c.reasoning.system = SHORT_SYSTEM
    c.train.update(steps=1, global_batch=8, seq_len=256)
    c.grpo.update(group_size=2, max_new_tokens=8)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=1, accuracy_problems=0, at_start=False)
    trained = [h for h in stages.run(c, str(tmp_path / "run")) if "loss" in h]
    assert len(trained) == 1 and np.isfinite(trained[0]["loss"])
    assert abs(trained[0]["kl"]) < 1e-6
    (questions, ids), = laid_out
    expected = {x["question"]: x["adapter"] for x in lines}
    np.testing.assert_array_equal(ids, [[expected[q]] * 2 for q in questions])
    assert {expected[q] for q in questions} == {-1, 0, 1}
