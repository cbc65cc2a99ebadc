"""The `phi4_jax` lm-evaluation-harness backend against lm-eval's own Hugging Face backend.

The reference is a small Phi-3-layout model that transformers writes (toy geometry, the
512-id bytes tokenizer written as `tokenizer.json`), loaded by lm-eval's `HFLM` on the CPU
in float32; phi4_jax reads the same directory through `--config.init_from`. Three local
tasks (tests/data/lm_eval: multiple choice, rolling log-likelihood, generation with a stop
string) run offline through both: per-request log-likelihoods agree within 1e-4, greedy
flags, generations and task scores exactly. Bucketing, stop tokens and the one-line errors
are checked against hand-worked cases.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from phi4_jax import config_base, evaluate
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.errors import Phi4Error
from phi4_jax.evals import buckets
from test_multihost import tensorboard_runs

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "data" / "lm_eval"
TASKS = ["phi4_toy_choice", "phi4_toy_text", "phi4_toy_continue"]
MAX_LENGTH = 32  # short enough that the rolling task needs several windows
# The bytes the toy model's head favours (its other rows are zero), so that greedy text
# is made of them and meets the generation task's stop string, '.'.
FAVOURED = "abcde .\n"


def _toy_hf_directory(folder: Path) -> None:
    """A random Phi3ForCausalLM of the toy size with the bytes tokenizer, as an export has."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from phi4_jax import export  # pylint: disable=g-import-not-at-top
    from phi4_jax.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top  # [hf]

    config = config_base.load_config("configs/pretrain.py", "toy")
    tokenizer = load_tokenizer("bytes")
    ids = hf_tokenizer.token_ids(tokenizer)
    hf_config = transformers.Phi3Config(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=config.model.rope_theta,
        max_position_embeddings=config.model.max_positions, bos_token_id=ids.bos,
        eos_token_id=ids.eos, pad_token_id=ids.pad, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
        favoured = torch.tensor(list(FAVOURED.encode()))
        head = torch.zeros_like(model.lm_head.weight)
        head[favoured] = 0.5 * torch.randn(len(favoured), head.shape[1])
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    hf_tokenizer.save_hf_tokenizer(tokenizer, folder, max_length=config.model.max_positions)
    (folder / export.GENERATION_CONFIG).write_text(json.dumps(export.generation_config(tokenizer)))


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Everything offline and the task data paths relative to the repository."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE",
                                             "HF_DATASETS_CACHE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                      HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("datasets")))
    cwd = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(cwd)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval") / "hf"
    _toy_hf_directory(folder)
    return folder


@pytest.fixture(scope="module")
def reference(offline, hf_dir):
    """lm-eval's Hugging Face backend on the three local tasks, every request logged."""
    pytest.importorskip("accelerate")
    from lm_eval import evaluator  # pylint: disable=g-import-not-at-top  # [eval]
    from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top

    model = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1,
                 max_length=MAX_LENGTH)
    return evaluator.simple_evaluate(model=model, tasks=TASKS, log_samples=True,
                                     task_manager=evaluate.task_manager(TASKS, str(TASKS_DIR)))


@pytest.fixture
def console(monkeypatch):
    """`main` as the command line runs it, but leaving pytest's log handlers in place."""
    from phi4_jax.train import metrics  # pylint: disable=g-import-not-at-top

    monkeypatch.setattr(metrics, "configure_console", lambda verbose: None)


def _samples(results):
    """(task, doc_id) -> the filtered responses of each request."""
    return {(task, s["doc_id"]): s["filtered_resps"]
            for task, samples in results["samples"].items() for s in samples}


@pytest.mark.hf
def test_phi4_jax_scores_and_generates_as_lm_evals_hf_backend(reference, hf_dir, tmp_path,
                                                               capsys, console):
    output = tmp_path / "results.json"
    status = evaluate.main([
        "evaluate", "--config=configs/pretrain.py:toy", f"--config.init_from={hf_dir}",
        f"--tasks={','.join(TASKS)}", f"--include_path={TASKS_DIR}", f"--output={output}",
        f"--workdir={tmp_path}", f"--max_length={MAX_LENGTH}", "--batch_size=4",
        "--log_samples"])
    printed = capsys.readouterr().out
    assert status == 0
    ours = json.loads(output.read_text())
    expected, got = _samples(reference), _samples(ours)
    assert expected.keys() == got.keys()
    for key, responses in expected.items():
        if key[0] == "phi4_toy_choice":  # (log-likelihood, is greedy) per choice
            np.testing.assert_allclose([r[0] for r in got[key]], [r[0] for r in responses],
                                       atol=1e-4, err_msg=str(key))
            assert [r[1] for r in got[key]] == [r[1] for r in responses], key
        elif key[0] == "phi4_toy_text":  # log p(document) over rolling windows
            np.testing.assert_allclose(got[key], responses, atol=1e-4, err_msg=str(key))
        else:
            assert got[key] == responses, key
    for task in TASKS:
        assert ours["results"][task] == pytest.approx(reference["results"][task], rel=1e-6), task
        assert f"|{task}" in printed
    scalars = tensorboard_runs(tmp_path)[0]
    assert scalars["lm_eval/phi4_toy_choice/acc"] == {0: pytest.approx(
        reference["results"]["phi4_toy_choice"]["acc,none"])}
    generated = [s["resps"][0][0] for s in ours["samples"]["phi4_toy_continue"]]
    assert any(0 < len(text) < 16 for text in generated)  # some stop at '.' (16 bytes: budget)


@pytest.mark.hf
def test_a_checkpoint_of_another_size_is_one_line_before_loading(offline, hf_dir, monkeypatch):
    from phi4_jax.interop import hf_checkpoint  # pylint: disable=g-import-not-at-top

    monkeypatch.setattr(hf_checkpoint, "_read_parameter",
                        lambda *a: pytest.fail("read before the shapes were checked"))
    config = _phi4_config(hf_dir)
    config.model.size = "tiny"  # Phi-4's vocabulary; the checkpoint has the bytes one
    with pytest.raises(Phi4Error, match=r"does not fit model.size='tiny': .*model.embed_tokens"
                       r".weight has shape \[512, 64\], expected \[100352, 64\]") as error:
        evaluate.plan(config, TASKS, include_path=str(TASKS_DIR))
    assert "\n" not in str(error.value)


def _phi4_config(init_from):
    config = config_base.load_config("configs/pretrain.py", "toy")
    config.init_from = str(init_from)
    return config


def test_an_unknown_task_is_one_line_with_close_names(offline):
    pytest.importorskip("lm_eval")
    with pytest.raises(evaluate.EvaluateError, match=r"^--tasks: unknown task 'phi4_toy_choise' "
                       r"\(close names: phi4_toy_choice, "):
        evaluate.task_manager(["phi4_toy_choise"], str(TASKS_DIR), builtin=False)
    manager = evaluate.task_manager(["phi4_toy_*"], str(TASKS_DIR), builtin=False)
    assert sorted(manager.all_tasks) == sorted(TASKS)


def test_the_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setattr(evaluate.importlib.util, "find_spec",
                        lambda name: None if name == "lm_eval" else object())
    with pytest.raises(evaluate.EvaluateError, match=r"not installed; pip install -e \"\.\[eval\]\""):
        evaluate.plan(_phi4_config(""), TASKS)


def test_command_line_mistakes_are_one_line(offline, tmp_path, capsys, console):
    pytest.importorskip("lm_eval")
    base = ["evaluate", "--config=configs/pretrain.py:toy", "--tasks=phi4_toy_choice",
            f"--include_path={TASKS_DIR}"]
    cases = {
        f"--config.init_from={tmp_path / 'nothing'}": "error: init_from=",
        "--config.model.layers=3": "error: --config.model.layers: no such key; ",
        "--config.init_from=": "error: init_from='': evaluation needs a trained model",
        "--config.lora.rank=4": "error: lora.rank=4: evaluation runs one whole model and routes no adapters",
    }
    for flag, start in cases.items():
        assert evaluate.main([*base, flag]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (flag, lines)


@pytest.mark.parametrize("length, largest, expected", [
    (1, None, 16), (16, None, 16), (17, None, 32), (100, None, 128), (40, 48, 48), (48, 48, 48)])
def test_lengths_round_up_to_a_power_of_two_within_the_context(length, largest, expected):
    assert buckets.bucket(length, largest) == expected


def test_batches_are_longest_first_within_rows_and_tokens():
    # lengths 40 and 33 pad to 64: one row each in 64 tokens; 17 and 5 pad to 32 and 16
    assert buckets.batches([5, 40, 17, 3, 33], max_rows=2, max_tokens=64) == [
        [1], [4], [2, 0], [3]]
    assert buckets.batches([3, 3, 3, 3, 3], max_rows=3, max_tokens=1024) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("count, multiple, expected", [
    (1, 1, 1), (3, 1, 4), (3, 8, 8), (5, 2, 8), (9, 4, 16), (1, 2, 2)])
def test_rows_pad_to_a_power_of_two_and_the_batch_devices(count, multiple, expected):
    assert buckets.padded_rows(count, multiple) == expected


def test_tokens_that_hold_a_stop_string_end_decoding():
    pytest.importorskip("lm_eval")
    from phi4_jax.evals import harness  # pylint: disable=g-import-not-at-top  # [eval]

    token_bytes = [b"a", b"b.", b"", b"..", b"\n\n", b"x\n", "é".encode()]
    assert harness.stop_token_ids(token_bytes, [".", "\n\n", ""]) == (1, 3, 4)
    assert harness.stop_token_ids(token_bytes, ["é"]) == (6,)


def test_generated_text_drops_special_tokens_and_ends_before_the_first_stop():
    pytest.importorskip("lm_eval")
    from phi4_jax.evals import harness  # pylint: disable=g-import-not-at-top  # [eval]

    tokenizer = load_tokenizer("bytes")
    ids = [*b"a b", tokenizer.im_start_id, *b"c. d\n\ne.", tokenizer.eot_id]
    assert harness.generated_text(tokenizer, ids, ["\n\n"]) == "a bc. d"
    assert harness.generated_text(tokenizer, ids, ["\n\n", "."]) == "a bc"
    assert harness.generated_text(tokenizer, ids, []) == "a bc. d\n\ne."


def test_chat_prompts_are_chatml_text_that_encodes_to_the_chat_ids():
    pytest.importorskip("lm_eval")
    from phi4_jax.evals import harness  # pylint: disable=g-import-not-at-top  # [eval]

    tokenizer = load_tokenizer("bytes")
    chat = [{"role": "user", "content": "2+2?"}]
    prompt = harness.chat_text(tokenizer, chat, add_generation_prompt=True)
    assert prompt == ("<|im_start|>user<|im_sep|>2+2?<|im_end|>"
                      "<|im_start|>assistant<|im_sep|>")
    prefill = harness.chat_text(tokenizer, [*chat, {"role": "assistant", "content": "It is"}],
                                add_generation_prompt=False)
    assert prefill == ("<|im_start|>user<|im_sep|>2+2?<|im_end|>"
                       "<|im_start|>assistant<|im_sep|>It is")
    assert tokenizer.encoding.encode(prompt, allowed_special="all") == [
        257, *b"user", 259, *b"2+2?", 258, 257, *b"assistant", 259]


def test_numeric_metrics_become_tensorboard_tags():
    results = {"results": {"arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                   "exact_match,flexible-extract": 0.25, "n": True}}}
    assert evaluate.numeric_metrics(results) == {"lm_eval/arc/acc": 0.5,
                                                 "lm_eval/arc/exact_match_flexible-extract": 0.25}
