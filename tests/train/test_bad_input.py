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
    _fails(tmp_path / "w", runs.TINY_PRETRAIN + runs.data_params(data) + ["loop.train.no_such = 1"],
           "no_such")
    assert not (tmp_path / "w").exists()


def test_missing_data_path(data, tmp_path):
    params = runs.TINY_PRETRAIN + runs.data_params(data) + ["PRETRAIN_TEXT = '/nonexistent/x.jsonl'"]
    _fails(tmp_path / "w", params, "/nonexistent/x.jsonl")
    assert not (tmp_path / "w").exists()


def test_workdir_of_another_run_and_checkpoint_of_another_size(data, tmp_path):
    params = runs.TINY_PRETRAIN + runs.data_params(data) + ["loop.train.total_steps = 2"]
    runs.run(tmp_path / "w", GIN, params)
    before = {p: os.path.getmtime(os.path.join(dp, p))
              for dp, _, files in os.walk(tmp_path / "w") for p in files}
    # Same workdir, another model size: refused before anything is written.
    _fails(tmp_path / "w", params + ["config.QwenConfig.hidden_size = 64"], "different run")
    after = {p: os.path.getmtime(os.path.join(dp, p))
             for dp, _, files in os.walk(tmp_path / "w") for p in files}
    assert before == after
    # A fresh run told to start from a checkpoint of another size.
    step_dir = tmp_path / "w" / "checkpoints" / "2"
    _fails(tmp_path / "w2", params + ["config.QwenConfig.hidden_size = 64",
                                      f"loop.train.init_from = '{step_dir}'"],
           "differs from the initial checkpoint")
    assert not (tmp_path / "w2").exists()
