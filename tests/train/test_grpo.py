"""GRPO's advantages, loss and metrics against a direct NumPy computation of TRL's formulas, on a
fixed batch: a random tiny policy, a different random reference, given completions, rewards and
old log-probs."""

import itertools

import numpy as np
import pytest
from flax import nnx

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.train import grpo
from qwen_jax.train.grpo_task import _completion_logps, completion_rows

CONFIG = QwenConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
GROUP, PROMPTS, PROMPT_LEN, NEW = 4, 3, 7, 5  # rows of 12 tokens: 3 loss chunks of 4
TEMPERATURE = 0.7


def _model(seed):
    return Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def batch():
    """Left-padded prompts, completions of varied lengths (one row cut at the budget), rewards
    with one group all equal, and old log-probs off the policy's by up to +-0.4."""
    rng = np.random.default_rng(0)
    n = GROUP * PROMPTS
    prompt_lens = rng.integers(2, PROMPT_LEN + 1, size=n)
    prompt_ids = rng.integers(1, CONFIG.vocab_size, size=(n, PROMPT_LEN)).astype(np.int32)
    prompt_mask = (np.arange(PROMPT_LEN)[None] >= PROMPT_LEN - prompt_lens[:, None]).astype(
        np.int32
    )
    prompt_ids = np.where(prompt_mask == 1, prompt_ids, 0)
    tokens = rng.integers(1, CONFIG.vocab_size, size=(n, NEW)).astype(np.int32)
    lengths = rng.integers(1, NEW + 1, size=n).astype(np.int32)
    lengths[0] = NEW
    rows = completion_rows(prompt_ids, prompt_mask, tokens, lengths, pad_id=0)
    rewards = rng.normal(size=n).round(1)
    rewards[GROUP : 2 * GROUP] = 0.5  # a group with nothing to compare
    policy, reference = _model(1), _model(2)
    offset = rng.uniform(-0.4, 0.4, size=rows["targets"].shape)
    logps, entropy = _numpy_logps(policy, rows)
    ref_logps, _ = _numpy_logps(reference, rows)
    # The rollout computes the reference's log-probs with the chunked path.
    got_ref = np.asarray(_completion_logps(reference, rows, temperature=TEMPERATURE, chunk_size=4))
    return rows, rewards, policy, offset, (logps, entropy, ref_logps, got_ref)


def test_rollout_logprobs_match_the_full_logits(batch):
    rows, *_, (_, _, ref_logps, got_ref) = batch
    mask = rows["completion_mask"]
    np.testing.assert_allclose(got_ref * mask, ref_logps * mask, atol=1e-5)


def _numpy_logps(model, rows):
    """Per-token log-probs and entropies from the model's full logits (not the chunked path)."""
    forward = nnx.jit(lambda m, r: m(r["inputs"], r["positions"], r["segment_ids"]))
    logits = np.asarray(forward(model, rows), np.float64)
    logits = logits / TEMPERATURE
    logits = logits - logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logps = np.take_along_axis(logp_all, rows["targets"][..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    return logps, entropy


def _trl_advantages(rewards, scale):
    """TRL's `_generate_and_score_completions`: group mean, std with Bessel's correction."""
    groups = rewards.reshape(-1, GROUP)
    mean = np.repeat(groups.mean(1), GROUP)
    if scale == "batch":
        std = np.full_like(mean, rewards.std(ddof=1))
    else:
        std = np.repeat(groups.std(1, ddof=1), GROUP)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv, {
        "reward": mean.mean(),
        "reward_std": std.mean(),
        "frac_reward_zero_std": np.isclose(std, 0).mean(),
    }


def _trl_loss(config, logps, old, ref, adv, mask, entropy):
    """TRL's `_compute_loss` and its logged metrics."""
    eps_low, eps_high = config.epsilon, config.upper_epsilon
    coef_1 = np.exp(logps - old)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv[:, None]
    per_token = -np.minimum(coef_1 * a, coef_2 * a)
    metrics = {}
    if config.beta:
        kl = np.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + config.beta * kl
        metrics["kl"] = (kl * mask).sum() / mask.sum()
    if config.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
    elif config.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * NEW)
    else:
        loss = (per_token * mask).sum() / mask.sum()
    low = (coef_1 < 1 - eps_low) & (a < 0)
    high = (coef_1 > 1 + eps_high) & (a > 0)
    metrics["clip_ratio/low_mean"] = (low * mask).sum() / mask.sum()
    metrics["clip_ratio/high_mean"] = (high * mask).sum() / mask.sum()
    metrics["clip_ratio/region_mean"] = ((low | high) * mask).sum() / mask.sum()
    metrics["entropy"] = (entropy * mask).sum() / mask.sum()
    return loss, metrics


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
def test_advantages_match_trl(batch, scale):
    rewards = batch[1]
    config = grpo.GRPOConfig(num_generations=GROUP, scale_rewards=scale)
    advantages, stats = grpo.advantages(rewards, config)
    want_adv, want_stats = _trl_advantages(rewards, scale)
    np.testing.assert_allclose(advantages, want_adv, rtol=1e-5, atol=1e-5)
    for key, value in want_stats.items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


# Every loss type, beta and iteration count; the advantages' scaling rotates through its values
# (it reaches the loss only through the advantages, tested on their own above).
CASES = [
    (*case, grpo.SCALE_REWARDS[i % 3])
    for i, case in enumerate(itertools.product(grpo.LOSS_TYPES, (0.0, 0.04), (1, 2)))
]


@pytest.mark.parametrize("loss_type,beta,iterations,scale", CASES)
def test_loss_and_metrics_match_trl(batch, loss_type, beta, iterations, scale):
    rows, rewards, policy, offset, (logps, entropy, ref_logps, got_ref) = batch
    config = grpo.GRPOConfig(
        num_generations=GROUP,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        scale_rewards=scale,
        num_iterations=iterations,
    )
    advantages, _ = grpo.advantages(rewards, config)
    want_adv, _ = _trl_advantages(rewards, scale)
    mask = rows["completion_mask"].astype(np.float64)
    old = logps + offset if iterations > 1 else logps

    step_batch = {**rows, "advantages": advantages}
    if iterations > 1:
        step_batch["old_logps"] = old.astype(np.float32)
    if beta:
        step_batch["ref_logps"] = got_ref
    loss_fn = grpo.make_grpo_loss_fn(
        config, max_completion_length=NEW, temperature=TEMPERATURE, chunk_size=4
    )
    loss_sum, aux = nnx.jit(loss_fn)(policy, step_batch, None)
    got = grpo.step_means({k: float(v) for k, v in aux.items()})
    want_loss, want_metrics = _trl_loss(config, logps, old, ref_logps, want_adv, mask, entropy)
    np.testing.assert_allclose(float(loss_sum) / got["weight"], want_loss, rtol=1e-5, atol=1e-6)
    assert set(want_metrics) == {k for k in got if k in grpo.TOKEN_METRICS}
    for key, value in want_metrics.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    if iterations > 1:  # the offsets move ratios past both clip edges in this batch
        assert got["clip_ratio/region_mean"] > 0


def test_equal_rewards_give_zero_advantages():
    config = grpo.GRPOConfig(num_generations=4)
    advantages, stats = grpo.advantages(np.array([1.0, 1, 1, 1, 0, 1, 0, 1]), config)
    np.testing.assert_array_equal(advantages[:4], 0.0)
    assert stats["frac_reward_zero_std"] == 0.5
    assert np.all(np.isfinite(advantages))


def test_nan_rewards_are_absent_in_the_weighted_sum():
    per_function = np.array([[1.0, np.nan], [0.0, 2.0]])
    np.testing.assert_allclose(grpo.combine_rewards(per_function, np.array([1.0, 0.5])), [1.0, 1.0])


def test_completion_rows_follow_the_decoder_layout():
    """Prompt [pad, a, b], completion [c, stop] of 3 budgeted: the targets that are completion
    tokens are c and stop; positions continue the prompt's; padding has segment 0."""
    rows = completion_rows(
        np.array([[0, 5, 6]]), np.array([[0, 1, 1]]), np.array([[7, 2, 2]]), np.array([2]), 0
    )
    np.testing.assert_array_equal(rows["inputs"], [[0, 5, 6, 7, 2, 0]])
    np.testing.assert_array_equal(rows["targets"], [[5, 6, 7, 2, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 0, 1, 2, 3, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["completion_mask"], [[0, 0, 1, 1, 0, 0]])


@pytest.mark.parametrize(
    "bad",
    [
        {"loss_type": "bnpo2"},
        {"scale_rewards": "std"},
        {"num_generations": 1},
        {"num_iterations": 0},
        {"beta": -1.0},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="GRPOConfig"):
        grpo.GRPOConfig(**bad)


def test_microbatches_and_devices_give_the_batchs_loss(batch):
    """The loss's sum/weight split: 2 microbatches on a data=2 x tensor=2 mesh equal one batch on
    one device (loss, and with SGD at learning rate 1 the gradients, to 1e-6), for grpo's
    per-completion means (dapo's token sums split the same way as the LM loss's)."""
    import pathlib
    import sys

    import jax
    import optax

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "parallel"))
    import sharding_fixtures as fx

    from qwen_jax.parallel import mesh as mesh_lib
    from qwen_jax.train import state as state_lib
    from qwen_jax.train import step as step_lib

    rows, rewards, _, offset, (logps, _, _, got_ref) = batch
    config = grpo.GRPOConfig(num_generations=GROUP, beta=0.04, num_iterations=2, loss_type="grpo")
    host = {
        **rows,
        "advantages": grpo.advantages(rewards, config)[0],
        "old_logps": (logps + offset).astype(np.float32),
        "ref_logps": got_ref,
    }
    loss_fn = grpo.make_grpo_loss_fn(
        config, max_completion_length=NEW, temperature=TEMPERATURE, chunk_size=4
    )
    rules, sgd = fx.rules_from_gin(), optax.sgd(1.0)
    results = []
    for mesh_config, microbatches in (
        (mesh_lib.MeshConfig(fsdp=1), 1),
        (mesh_lib.MeshConfig(data=2, fsdp=1, tensor=2), 2),
    ):
        devices = jax.devices()[: 1 if microbatches == 1 else 4]
        mesh = mesh_lib.make_mesh(mesh_config, devices=devices)
        state, graphdef, shardings = state_lib.create_train_state(
            lambda: Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(1)), sgd, mesh, rules
        )
        batch_shardings = mesh_lib.batch_shardings(mesh, rules, host)
        step = step_lib.make_train_step(
            graphdef,
            loss_fn,
            sgd,
            mesh=mesh,
            rules=rules,
            state_shardings=shardings,
            batch_shardings=batch_shardings,
            microbatches=microbatches,
        )
        before = fx.to_host(state.params)
        state, metrics = step(state, jax.device_put(host, batch_shardings))
        delta = jax.tree.map(lambda new, old: np.asarray(new) - old, state.params, before)
        results.append((fx.to_host(metrics), delta))
    (m1, d1), (m2, d2) = results
    for key in ("loss", "grad_norm", "weight", "completion_tokens", "kl"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert float(m1["grad_norm"]) > 1e-3
    for a, b in zip(jax.tree.leaves(d2), jax.tree.leaves(d1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
