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


def _samples(results):
    """(task, doc_id) -> the filtered responses of each request."""
    return {(task, s["doc_id"]): s["filtered_resps"]
            for task, samples in results["samples"].items() for s in samples}


@pytest.mark.hf
def test_phi4_jax_scores_and_generates_as_lm_evals_hf_backend(reference, hf_dir, tmp_path,
                                                               capsys):
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
    print(generated)
