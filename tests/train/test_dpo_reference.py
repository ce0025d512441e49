"""DPO with reference log-probs precomputed before training equals DPO computing them in the step."""

import os

import gin
import numpy as np
import pytest

import train_runs as runs
from qwen_jax import cli, configurables
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH
from qwen_jax.train import loop, reference

# rewards/accuracies is left out: it counts margins > 0, and the first steps' margins are float
# noise around 0 (policy == reference) that either computation may round to either side.
TRL_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_reference")
    data = runs.write_data(root / "data")
    runs.save_tiny_checkpoint(root / "init", seed=1)
    return root, data


def _train(workdir, setup, *, precompute: bool, steps: int = 3, init: bool = True):
    root, data = setup
    gin.clear_config()
    # Without an initial checkpoint the architecture comes from gin.
    files = ["configs/demo/dpo.gin"] + ([] if init else ["configs/demo/model.gin"])
    cli.parse_gin(
        files,
        [
            f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
            f"PREFERENCE_TRAIN = '{data['preference_train.jsonl']}'",
            f"PREFERENCE_EVAL = '{data['preference_eval.jsonl']}'",
            f"INIT_FROM = {repr(str(root / 'init')) if init else None}",
            f"DPO_STEPS = {steps}",
            "optimizer.warmup_cosine.warmup_steps = 1",
            "tasks.DPOTask.batch_size = 8",
            "tasks.DPOTask.eval_batch_size = 8",
            "tasks.DPOTask.seq_len = 40",
            "tasks.DPOTask.prompt_len = 32",
            "tasks.DPOTask.max_new_tokens = 4",
            "setup.RunConfig.log_every = 1",
            "setup.RunConfig.eval_at_start = False",
            f"tasks.DPOTask.precompute_reference = {precompute}",
        ],
    )
    try:
        return loop.train(str(workdir), configurables.train_setup())
    finally:
        gin.clear_config()


def test_precomputed_reference_equals_reference_in_the_step(setup, tmp_path):
    in_step = _train(tmp_path / "in_step", setup, precompute=False)
    table = _train(tmp_path / "table", setup, precompute=True)

    a, b = runs.train_records(tmp_path / "in_step"), runs.train_records(tmp_path / "table")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in TRL_METRICS:
            np.testing.assert_allclose(
                b[step][key], a[step][key], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {key}"
            )
    for key in TRL_METRICS:
        np.testing.assert_allclose(
            table.eval[key], in_step.eval[key], rtol=1e-5, atol=1e-6, err_msg=f"eval {key}"
        )
    pa, pb = (
        runs.flat(runs.load_params(tmp_path / "in_step", 3)),
        runs.flat(runs.load_params(tmp_path / "table", 3)),
    )
    for name in pa:
        np.testing.assert_allclose(pb[name], pa[name], rtol=1e-5, atol=1e-6, err_msg=name)

    # No frozen model in the state: the checkpoint holds none; the table covers every pair.
    assert os.path.isdir(tmp_path / "in_step" / "checkpoints" / "3" / "frozen")
    assert not os.path.exists(tmp_path / "table" / "checkpoints" / "3" / "frozen")
    path = tmp_path / "table" / reference.TABLE_FILE
    stored = reference.load_table(str(path))
    root, data = setup
    lines = sum(
        1
        for name in ("preference_train.jsonl", "preference_eval.jsonl")
        for _ in open(data[name], encoding="utf-8")
    )
    assert len(stored) == lines
    assert all(c < 0 and r < 0 for c, r in stored.values())

    # A resumed run reads the table back instead of recomputing it.
    written = os.path.getmtime(path)
    resumed = _train(tmp_path / "table", setup, precompute=True, steps=4)
    assert resumed.step == 4 and os.path.getmtime(path) == written


def test_precompute_without_reference_weights_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="precompute_reference needs the reference's weights"):
        _train(tmp_path / "w", setup, precompute=True, init=False)
    assert not (tmp_path / "w").exists()


def test_a_truncated_table_is_one_clear_error(tmp_path):
    path = tmp_path / reference.TABLE_FILE
    reference.save_table(str(path), {"pairs.jsonl:1": (-1.0, -2.0)})
    assert reference.load_table(str(path)) == {"pairs.jsonl:1": (-1.0, -2.0)}
    path.write_bytes(path.read_bytes()[:40])  # cut short, e.g. by a full disk
    with pytest.raises(ValueError, match="not a readable reference table .*delete it"):
        reference.load_table(str(path))
