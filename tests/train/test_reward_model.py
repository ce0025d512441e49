"""The reward model: TRL's RewardTrainer loss and metrics, training through the entry point on
the demo's preference pairs, and scoring GRPO completions with the trained checkpoint."""

import json
import os

import gin
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_runs as runs
from qwen_jax import cli, configurables
from qwen_jax.checkpoint import model_io, pretrained
from qwen_jax.data import demo_corpus
from qwen_jax.data.chat import DEFAULT_SYSTEM_PROMPT
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import build_model
from qwen_jax.parallel import host_data
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import loop, reward_model


def _trl_reward_loss(chosen, rejected, center):
    """TRL RewardTrainer.compute_loss and its metrics, in NumPy (float64)."""
    chosen, rejected = np.float64(chosen), np.float64(rejected)
    loss = np.mean(np.log1p(np.exp(-(chosen - rejected))))
    if center:
        loss += center * np.mean((chosen + rejected) ** 2)
    return loss, {
        "accuracy": np.mean(chosen > rejected),
        "margin": np.mean(chosen - rejected),
        "mean_reward": np.mean(np.concatenate([chosen, rejected])),
    }


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_loss_and_metrics_equal_trls(center):
    """Through the train step's loss function on a tiny classifier, padding pairs included:
    the summed terms over the number of pairs equal TRL's batch means of the same scores."""
    config = runs.tiny_config(num_labels=1)
    model = build_model(config, rngs=nnx.Rngs(3))
    rng = np.random.RandomState(0)
    pairs, length = 6, 12
    batch = {}
    for side in ("chosen", "rejected"):
        lengths = rng.randint(4, length + 1, pairs)
        lengths[-1] = 0  # a padding pair, as at the end of an eval pass
        segment = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        batch[f"{side}_inputs"] = rng.randint(0, config.vocab_size, (pairs, length)) * segment
        batch[f"{side}_segment_ids"] = segment
        batch[f"{side}_positions"] = np.arange(length)[None].repeat(pairs, 0) * segment
        batch[f"{side}_loss_mask"] = segment.astype(np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_sum, aux = reward_model.make_reward_loss_fn(reward_model.RewardConfig(center))(
        model, batch, None
    )
    chosen, rejected = (np.asarray(s)[: pairs - 1] for s in reward_model.pair_scores(model, batch))
    want_loss, want = _trl_reward_loss(chosen, rejected, center)
    assert float(aux["weight"]) == pairs - 1
    np.testing.assert_allclose(float(loss_sum) / (pairs - 1), want_loss, rtol=1e-6)
    for key, value in want.items():
        np.testing.assert_allclose(float(aux[key]) / (pairs - 1), value, rtol=1e-6, atol=1e-7)
    # The score of a row is its last real token's: what follows it changes nothing.
    noisy = dict(batch)
    noisy["chosen_inputs"] = jnp.where(batch["chosen_segment_ids"] == 0, 7, batch["chosen_inputs"])
    np.testing.assert_array_equal(
        np.asarray(reward_model.pair_scores(model, noisy)[0])[: pairs - 1], chosen
    )


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The demo's preference pairs: 400 to train on, 100 held-out ones (questions no training
    pair asks)."""
    root = tmp_path_factory.mktemp("reward_model")
    paths = {}
    for name, seed, n, held_out in (("train", 6, 400, False), ("eval", 7, 100, True)):
        paths[name] = str(root / f"pairs_{name}.jsonl")
        demo_corpus.write_jsonl(
            paths[name], demo_corpus.preference_records(seed, n, [], held_out=held_out)
        )
    return root, paths


def _train(workdir, pairs, init_from, seed: int, steps: int):
    _, paths = pairs
    gin.clear_config()
    cli.parse_gin(
        ["configs/reward_model.gin", "configs/mesh/data.gin"],
        [
            f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
            f"INIT_FROM = '{init_from}'",
            f"PREFERENCE_TRAIN = '{paths['train']}'",
            f"PREFERENCE_EVAL = '{paths['eval']}'",
            f"RM_STEPS = {steps}",
            f"setup.RunConfig.seed = {seed}",
            "SEQ_LEN = 48",
            "BATCH_SIZE = 16",
            "LEARNING_RATE = 3e-3",
            "reward_model.RewardModelTask.prompt_len = 40",
            "reward_model.RewardModelTask.num_epochs = None",
            "reward_model.RewardModelTask.eval_batch_size = 32",
            f"setup.RunConfig.eval_every = {steps}",
            f"manager.CheckpointConfig.every_steps = {steps}",
        ],
    )
    try:
        return loop.train(str(workdir), configurables.train_setup())
    finally:
        gin.clear_config()


# Held-out pair accuracy, measured 2026-11-24 on this project's CPU VM over 8 runs (starting
# checkpoints of seeds 1 and 2, run seeds 0-3; docs/results.md, "The reward model"): 0.75-0.88
# after 60 steps. Before, the new score head is a random draw, and so is its accuracy
# (0.19-0.90): a head that happens to align with the answer style starts high. So each seed must
# end well above chance, and the seeds together must rise. The start is fixed by the seeds below
# (0.21, 0.74, 0.35); the measured mean rise is 0.37, and it would be 0.32 if every run ended at
# the worst of the 8 figures (0.75).
RM_STEPS = 60
MIN_ACCURACY = 0.65
MIN_MEAN_RISE = 0.1


@pytest.fixture(scope="module")
def trained(pairs):
    """Reward models trained from a random causal LM's checkpoint, seeds 0-2."""
    root, _ = pairs
    runs.save_tiny_checkpoint(root / "init", seed=1)
    return [_train(root / f"rm{seed}", pairs, root / "init", seed, RM_STEPS) for seed in range(3)]


def test_training_raises_held_out_pair_accuracy(trained):
    figures = [(r.eval_at_start["accuracy"], r.eval["accuracy"]) for r in trained]
    assert min(after for _, after in figures) >= MIN_ACCURACY, figures
    assert np.mean([after - before for before, after in figures]) >= MIN_MEAN_RISE, figures
    # The run is a sequence classifier started from the causal LM's decoder.
    config = json.load(open(os.path.join(trained[0].workdir, "run.json")))
    assert config["task"] == "reward_model"


def _rm_checkpoint(result) -> str:
    return os.path.join(result.workdir, "checkpoints", str(result.step))


def _attached(checkpoint, placement):
    score = reward_model.RewardModelScore(checkpoint, batch_size=16)
    score.attach(
        Tokenizer.from_file(DEMO_TOKENIZER_PATH),
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        max_prompt_len=40,
        max_length=48,
        load_model=lambda d: pretrained.load(d, Runtime(), placement)[0],
        placement=placement,
    )
    return score


def test_reward_function_scores_as_the_trained_model(trained, pairs):
    """`RewardModelScore` on held-out (prompt, answer) pairs, sharded over 8 devices, gives
    the scores of the training task's own rows on one device, so GRPO is rewarded by what the
    reward model learned."""
    _, paths = pairs
    gin.clear_config()
    try:
        gin.parse_config_file("configs/mesh/rules.gin")
        rules = configurables.logical_rules()
    finally:
        gin.clear_config()
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=4))
    score = _attached(_rm_checkpoint(trained[0]), host_data.Placement(mesh, rules))
    records = [json.loads(line) for line in open(paths["eval"])][:20]
    got = {
        side: np.asarray(score([r["prompt"] for r in records], [r[side] for r in records]))
        for side in ("chosen", "rejected")
    }
    task = reward_model.RewardModelTask(paths["eval"], seq_len=48, prompt_len=40, batch_size=20)
    tokenizer = Tokenizer.from_file(DEMO_TOKENIZER_PATH)
    rows = next(iter(task._pairs(paths["eval"], tokenizer, batch_size=20, for_eval=True)))
    model = pretrained.load(_rm_checkpoint(trained[0]), Runtime(), None)[0]
    want = reward_model.pair_scores(model, {k: jnp.asarray(v) for k, v in rows.items()})
    for side, expected in zip(("chosen", "rejected"), want):
        np.testing.assert_allclose(got[side], np.asarray(expected)[:20], rtol=1e-5, atol=1e-5)
    assert np.mean(got["chosen"] > got["rejected"]) >= 0.6


def _grpo(root, workdir, reward_bindings):
    data = runs.write_data(root / "grpo_data")
    params = [
        "from qwen_jax.train import reward_model",
        f"GRPO_PROMPTS = '{data['grpo_prompts.jsonl']}'",
        f"GRPO_EVAL = '{data['grpo_eval.jsonl']}'",
        f"INIT_FROM = '{root / 'init'}'",
        f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
        "GRPO_STEPS = 2",
        "grpo_task.GRPOTask.batch_size = 2",
        "grpo_task.GRPOTask.max_prompt_len = 40",
        "grpo_task.GRPOTask.max_new_tokens = 6",
        "grpo_task.GRPOTask.eval_examples = 8",
        "grpo_task.GRPOTask.reward_functions = [@reward_model.RewardModelScore()]",
        "grpo.GRPOConfig.num_generations = 4",
        "optimizer.warmup_cosine.warmup_steps = 1",
        "setup.RunConfig.eval_at_start = False",
        "setup.RunConfig.log_every = 1",
        *reward_bindings,
    ]
    return runs.run(workdir, ["configs/demo/grpo.gin"], params, check=False)


def test_grpo_is_rewarded_by_the_reward_model(trained, pairs):
    root, _ = pairs
    checkpoint = _rm_checkpoint(trained[0])
    workdir = root / "grpo"
    result = _grpo(root, workdir, [f"reward_model.RewardModelScore.checkpoint = '{checkpoint}'"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = runs.train_records(workdir)
    assert sorted(records) == [1, 2]
    assert all(np.isfinite(r["rewards/reward_model/mean"]) for r in records.values())
    assert records[1]["reward_std"] > 0  # the model tells the sampled completions apart
    assert "rewards/reward_model" in runs.train_records(workdir, split="eval")[2]


def _one_line_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_reward_model_of_another_vocabulary_is_one_line(trained, pairs, tmp_path):
    """The trained reward model stored with a tokenizer whose two tokens trade ids."""
    root, _ = pairs
    with open(DEMO_TOKENIZER_PATH, encoding="utf-8") as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[100], sorted(vocab)[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    config, params = model_io.load_model_checkpoint(_rm_checkpoint(trained[0]))
    model_io.save_model_checkpoint(tmp_path / "rm", params, config, tokenizer_from=tmp_path / "tok")

    result = _grpo(
        root, tmp_path / "w", [f"reward_model.RewardModelScore.checkpoint = '{tmp_path / 'rm'}'"]
    )
    line = _one_line_error(result)
    assert f"reward model {tmp_path / 'rm'}: its tokenizer" in line
    assert "has another vocabulary than the policy's: 2 tokens differ" in line
    assert not (tmp_path / "w").exists()


def test_a_causal_lm_as_the_reward_model_is_one_line(pairs, tmp_path):
    root, _ = pairs
    result = _grpo(
        root, tmp_path / "w", [f"reward_model.RewardModelScore.checkpoint = '{root / 'init'}'"]
    )
    line = _one_line_error(result)
    assert "is a Qwen2ForCausalLM, not a reward model" in line
    assert not (tmp_path / "w").exists()
