"""Bad input through the real CLI: one clear message, exit status 1, nothing overwritten."""

import os

import pytest

import train_runs as runs

GIN = ["configs/demo/pretrain.gin"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.write_data(tmp_path_factory.mktemp("data"))


def _fails(workdir, params, match, gin=GIN):
    result = runs.run(workdir, gin, params, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in result.stderr, result.stderr[-3000:]
    return result


def test_unknown_gin_parameter(data, tmp_path):
    _fails(
        tmp_path / "w",
        runs.TINY_PRETRAIN + runs.data_params(data) + ["setup.RunConfig.no_such = 1"],
        "no_such",
    )
    assert not (tmp_path / "w").exists()


def test_missing_data_path(data, tmp_path):
    params = (
        runs.TINY_PRETRAIN + runs.data_params(data) + ["PRETRAIN_TEXT = '/nonexistent/x.jsonl'"]
    )
    _fails(tmp_path / "w", params, "/nonexistent/x.jsonl")
    assert not (tmp_path / "w").exists()


def test_workdir_of_another_run_and_checkpoint_of_another_size(data, tmp_path):
    params = runs.TINY_PRETRAIN + runs.data_params(data) + ["setup.RunConfig.total_steps = 2"]
    runs.run(tmp_path / "w", GIN, params)
    before = {
        p: os.path.getmtime(os.path.join(dp, p))
        for dp, _, files in os.walk(tmp_path / "w")
        for p in files
    }
    # Same workdir, another model size: refused before anything is written.
    _fails(tmp_path / "w", params + ["config.QwenConfig.hidden_size = 64"], "different run")
    after = {
        p: os.path.getmtime(os.path.join(dp, p))
        for dp, _, files in os.walk(tmp_path / "w")
        for p in files
    }
    assert before == after
    # A fresh run told to start from a checkpoint of another size.
    step_dir = tmp_path / "w" / "checkpoints" / "2"
    _fails(
        tmp_path / "w2",
        params
        + ["config.QwenConfig.hidden_size = 64", f"setup.RunConfig.init_from = '{step_dir}'"],
        "differs from the initial checkpoint",
    )
    assert not (tmp_path / "w2").exists()


def test_a_run_from_scratch_must_name_its_tokenizer(data, tmp_path):
    params = [p for p in runs.TINY_PRETRAIN if "tokenizer_path" not in p] + runs.data_params(data)
    _fails(tmp_path / "w", params, "no tokenizer")
    assert not (tmp_path / "w").exists()


def test_a_missing_required_macro_names_the_flag_that_sets_it(data, tmp_path):
    params = [
        p for p in runs.TINY_PRETRAIN + runs.data_params(data) if not p.startswith("PRETRAIN_TEXT")
    ]
    result = _fails(tmp_path / "w", params, "PRETRAIN_TEXT is required")
    assert "--gin_param=PRETRAIN_TEXT=" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def qwen_vocab_checkpoint(tmp_path_factory):
    """A tiny model checkpoint with Qwen2.5's vocabulary and stop id, and no tokenizer."""
    from flax import nnx

    from qwen_jax.checkpoint import model_io
    from qwen_jax.model.config import QwenConfig
    from qwen_jax.model.transformer import Qwen2ForCausalLM

    config = QwenConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=151936,
        tie_word_embeddings=True,
        eos_token_id=151645,
    )
    path = tmp_path_factory.mktemp("qwen_vocab") / "ckpt"
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    model_io.save_model_checkpoint(path, model_io.model_params(model), config)
    return path


def _sft_params(init_from, train_file) -> list[str]:
    return [
        f"INIT_FROM = '{init_from}'",
        f"CHAT_TRAIN = '{train_file}'",
        f"CHAT_EVAL = '{train_file}'",
        "SFT_STEPS = 2",
        "SEQ_LEN = 64",
        "BATCH_SIZE = 2",
    ]


def test_the_demo_tokenizer_is_refused_for_a_qwen_checkpoint(data, qwen_vocab_checkpoint, tmp_path):
    params = _sft_params(qwen_vocab_checkpoint, data["chat_train.jsonl"]) + [
        f"setup.RunConfig.tokenizer_path = '{runs.DEMO_TOKENIZER_PATH}'"
    ]
    _fails(tmp_path / "w", params, "does not belong to the model", gin=["configs/sft.gin"])
    assert not (tmp_path / "w").exists()


def test_an_unknown_data_format_names_the_file_and_its_fields(data, tmp_path):
    # A 2-step run whose checkpoint (and the demo tokenizer it carries) the SFT run starts from.
    params = runs.TINY_PRETRAIN + runs.data_params(data) + ["setup.RunConfig.total_steps = 2"]
    runs.run(tmp_path / "base", GIN, params)
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n' * 4)
    result = _fails(
        tmp_path / "w",
        _sft_params(tmp_path / "base" / "checkpoints" / "2", bad),
        f"{bad}:1: unknown messages data format",
        gin=["configs/sft.gin"],
    )
    assert "['answer', 'question']" in result.stderr
    assert not (tmp_path / "w").exists()


def test_rerunning_a_finished_run_is_a_no_op_and_a_larger_total_continues(data, tmp_path):
    params = runs.TINY_PRETRAIN + runs.data_params(data) + ["setup.RunConfig.total_steps = 3"]
    runs.run(tmp_path / "w", GIN, params)
    again = runs.run(tmp_path / "w", GIN, params)
    assert "is complete at step 3: nothing to do" in again.stderr
    assert runs.checkpoint_steps(tmp_path / "w") == [3]
    runs.run(tmp_path / "w", GIN, params + ["setup.RunConfig.total_steps = 5"])
    assert runs.checkpoint_steps(tmp_path / "w")[-1] == 5
    assert sorted(runs.train_records(tmp_path / "w")) == [1, 2, 3, 4, 5]
