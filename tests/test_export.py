"""`python -m phi4_jax.export`: transformers loads the exported directory of a toy run and
decodes greedily the tokens phi4_jax decodes from the checkpoint, with and without a merged
LoRA adapter (phi4_jax's side runs the adapter unmerged, beside the backbone); the exported
tokenizer encodes and lays out chats as phi4_jax's; bad flags are one line before anything
is loaded."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax import config_base, export, stages
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.model import config as model_config, lora
from phi4_jax.model.transformer import init_model
from phi4_jax.sampling import decode
from phi4_jax.train import checkpoint, initial_params

PROMPT = "The quick brown fox"
NEW_TOKENS = 12


@pytest.fixture(scope="session")
def lora_toy(made_once, pretrained_toy):
    """A one-step LoRA SFT run on the pretrained toy, lr high enough that its first adapter
    moves the outputs; a second adapter stays untrained."""
    def sft(workdir):
        c = config_base.load_config("configs/sft.py", "toy")
        c.lora.update(rank=4, alpha=8.0, targets=("q", "v", "o", "down"),
                      adapters=("default", "spare"))
        c.train.update(steps=1, warmup_steps=0, seq_len=64, global_batch=8, lr=3e-2)
        c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
        c.eval.update(every_steps=1, batches=1, accuracy_problems=0, at_start=False)
        c.init_from = str(pretrained_toy)
        stages.run(c, str(workdir))

    return made_once("export_lora_toy", sft)


def _trained_model(plan: export.ExportPlan):
    """The checkpoint's model as phi4_jax runs it (a LoRA adapter unmerged, adapter 0)."""
    cfg = plan.model_cfg
    adapters, backbone = export._abstract_params(cfg)
    step = initial_params.InitialCheckpoint("phi4", plan.step_dir)
    if cfg.lora is None:
        params = initial_params.load(step, backbone, cfg)
    else:
        params = lora.join(initial_params.load(step, adapters, cfg),
                           initial_params.load(plan.backbone, backbone, cfg))
    return nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg))), params


def _phi4_greedy(graphdef, params, cfg, prompt_ids, stop_ids):
    sampling = decode.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0,
                                     stop_ids=tuple(stop_ids))
    out = decode.compiled_generate(graphdef, cfg, sampling)(
        params, decode.left_pad([prompt_ids]), decode.row_keys(0, [0]))
    return np.asarray(out.tokens[0][: int(out.lengths[0])]).tolist()


def _phi4_logits(graphdef, params, prompt_ids):
    tokens = jnp.asarray([prompt_ids])
    positions = jnp.arange(len(prompt_ids))[None]
    return np.asarray(nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))[0])


def _export_and_compare(workdir, tmp_path, adapter=None):
    """Exports through the command line, then checks transformers' greedy tokens and logits
    against phi4_jax's; returns the model, prompt and phi4_jax logits for further checks."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    command = [sys.executable, "-m", "phi4_jax.export", f"--workdir={workdir}", f"--out={out}"]
    result = subprocess.run(command + ([f"--adapter={adapter}"] if adapter else []),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = export.plan(str(workdir), str(tmp_path / "unused"), adapter=adapter)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt_ids = load_tokenizer("bytes").encode(PROMPT)
    assert tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == prompt_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        hf_out = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                                max_new_tokens=NEW_TOKENS)
        hf_logits = model(torch.tensor([prompt_ids])).logits[0].float().numpy()
    hf_tokens = hf_out[0, len(prompt_ids):].tolist()
    graphdef, params = _trained_model(plan)
    stops = json.loads((out / export.GENERATION_CONFIG).read_text())["eos_token_id"]
    assert hf_tokens == _phi4_greedy(graphdef, params, plan.model_cfg, prompt_ids, stops)
    logits = _phi4_logits(graphdef, params, prompt_ids)
    np.testing.assert_allclose(hf_logits, logits, atol=1e-4 * np.abs(logits).max())
    return graphdef, params, prompt_ids, hf_logits


@pytest.mark.hf
def test_transformers_decodes_the_exported_run_as_phi4_jax_does(pretrained_toy, tmp_path):
    _export_and_compare(pretrained_toy, tmp_path)


@pytest.mark.hf
def test_a_merged_adapter_decodes_as_the_adapted_model(lora_toy, tmp_path):
    graphdef, params, prompt_ids, hf_logits = _export_and_compare(lora_toy, tmp_path, "default")
    backbone_logits = _phi4_logits(graphdef, lora.as_backbone(params), prompt_ids)
    assert np.abs(hf_logits - backbone_logits).max() > 1e-2  # the adapter changed the model


def test_the_exported_tokenizer_encodes_and_lays_out_chats_as_phi4_jax():
    transformers = pytest.importorskip("transformers")
    from phi4_jax.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top  # [hf] extra
    tokenizer = load_tokenizer("bytes")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer.hf_tokenizer(tokenizer),
        chat_template=hf_tokenizer.chat_template(tokenizer.chat))
    text = "Ünïcödé 12 don't\n\n  stop 🎉\t"
    assert fast(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    for prompt in (False, True):
        ids = fast.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True,
                                       return_dict=False)
        assert list(ids) == tokenizer.encode_chat(chat, add_generation_prompt=prompt).ids


def _refused(match, **flags):
    with pytest.raises(export.ExportError, match=match) as error:
        export.plan(**flags)
    assert "\n" not in str(error.value)


@pytest.mark.slow  # needs two trained runs
def test_bad_exports_are_one_line_before_anything_loads(pretrained_toy, lora_toy, tmp_path):
    out = str(tmp_path / "out")
    _refused(r"--workdir=.*holds no checkpoint", workdir=str(tmp_path), out=out)
    _refused(r"--step=7: that checkpoint does not exist .*the intact steps are 1\.",
             workdir=str(pretrained_toy), out=out, step=7)
    _refused(r"--adapter=other: .*no such adapter; choose one of default, spare\.",
             workdir=str(lora_toy), out=out, adapter="other")
    _refused(r"--adapter is needed: .*\(default, spare\)", workdir=str(lora_toy), out=out)
    _refused(r"--adapter=default: .*trained the whole model", workdir=str(pretrained_toy),
             out=out, adapter="default")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    _refused(r"--out=.* already holds files \(config.json\); .*never overwrites",
             workdir=str(pretrained_toy), out=out)


@pytest.mark.slow  # needs two trained runs
def test_the_checkpoint_records_the_model_and_the_lora_backbone(pretrained_toy, lora_toy):
    meta = checkpoint.saved_meta(lora_toy / "checkpoints" / "1")
    assert meta["init_from"] == {"kind": "phi4",
                                 "path": str((pretrained_toy / "checkpoints" / "1").resolve())}
    cfg = export.plan(str(lora_toy), "/nonexistent/out", adapter="spare").model_cfg
    assert (cfg.name, cfg.lora.adapters, cfg.lora.rank) == ("toy", ("default", "spare"), 4)


@pytest.mark.slow  # a subprocess
def test_a_command_line_mistake_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "phi4_jax.export", f"--workdir={tmp_path}",
                             f"--out={tmp_path / 'out'}"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --workdir={tmp_path} holds no checkpoint (no intact step folder in "
        f"{tmp_path / 'checkpoints'}); give the workdir of a run that saved one."]
    assert not (tmp_path / "out").exists()


def test_a_recorded_model_config_reads_back_equal():
    cfg = model_config.model_config_for("mini-tiny", lora=lora.LoRAConfig(
        rank=2, alpha=4.0, targets=("q", "down"), adapters=("a", "b"), backbone_dtype="bfloat16"))
    record = json.loads(json.dumps(model_config.to_record(cfg)))
    assert model_config.from_record(record) == cfg


def test_export_without_the_tokenizers_library_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name: None if name == "tokenizers" else object())
    with pytest.raises(export.ExportError, match=r"`tokenizers` .* pip install -e \"\.\[hf\]\""):
        export.plan(str(tmp_path), str(tmp_path / "out"))
