"""DPO losses and metrics against their definitions and against a direct computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.train import dpo


def _logps(c, r):
    return {"chosen": jnp.asarray(c, jnp.float32), "rejected": jnp.asarray(r, jnp.float32)}


LENGTHS = _logps([3.0, 5.0, 2.0], [4.0, 1.0, 6.0])


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_step_zero(loss_type):
    """Policy == reference: every reward is 0, accuracies are 0 (strict), sigmoid = ln 2,
    IPO = (1/(2 beta))^2, hinge = 1, robust = ln 2."""
    config = dpo.DPOConfig(beta=0.1, loss_type=loss_type)
    logps = _logps([-3.0, -7.5, -1.0], [-4.0, -2.0, -9.0])
    loss, metrics = dpo.dpo_loss_and_metrics(config, logps, logps, LENGTHS)
    expected = {
        "sigmoid": math.log(2),
        "robust": math.log(2),
        "hinge": 1.0,
        "ipo": (1 / (2 * 0.1)) ** 2,
    }[loss_type]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == 0.0, key


def test_accuracy_is_strict():
    config = dpo.DPOConfig(beta=0.1)
    policy = _logps([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0])  # win, tie, loss
    reference = _logps([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    _, metrics = dpo.dpo_loss_and_metrics(config, policy, reference, LENGTHS)
    np.testing.assert_allclose(metrics["rewards/accuracies"], 1 / 3)


@pytest.mark.parametrize(
    "loss_type,smoothing",
    [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_losses_match_their_formulas(loss_type, smoothing):
    beta = 0.3
    config = dpo.DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    pc, pr = np.array([-3.0, -7.5, -1.0]), np.array([-4.0, -2.0, -9.0])
    rc, rr = np.array([-3.5, -6.0, -2.0]), np.array([-3.0, -2.5, -8.0])
    lc, lr = np.asarray(LENGTHS["chosen"]), np.asarray(LENGTHS["rejected"])
    loss, _ = dpo.dpo_loss_and_metrics(config, _logps(pc, pr), _logps(rc, rr), LENGTHS)

    def logsig(x):
        return -np.log1p(np.exp(-x))

    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        ref = -(1 - smoothing) * logsig(beta * h) - smoothing * logsig(-beta * h)
    elif loss_type == "robust":
        ref = (-(1 - smoothing) * logsig(beta * h) + smoothing * logsig(-beta * h)) / (
            1 - 2 * smoothing
        )
    elif loss_type == "hinge":
        ref = np.maximum(0, 1 - beta * h)
    else:
        h = (pc / lc - pr / lr) - (rc / lc - rr / lr)
        ref = (h - 1 / (2 * beta)) ** 2
    np.testing.assert_allclose(loss, ref.mean(), rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_adds_the_chosen_nll_per_token(loss_type):
    """rpo_alpha adds alpha * (-log p(chosen) / chosen tokens) per pair to the preference loss;
    the reported rewards and log-probs do not change."""
    pc, pr = np.array([-3.0, -7.5, -1.0]), np.array([-4.0, -2.0, -9.0])
    rc, rr = np.array([-3.5, -6.0, -2.0]), np.array([-3.0, -2.5, -8.0])
    lc = np.asarray(LENGTHS["chosen"])
    args = (_logps(pc, pr), _logps(rc, rr), LENGTHS)
    plain, plain_metrics = dpo.dpo_loss_and_metrics(dpo.DPOConfig(loss_type=loss_type), *args)
    rpo, rpo_metrics = dpo.dpo_loss_and_metrics(
        dpo.DPOConfig(loss_type=loss_type, rpo_alpha=0.5), *args
    )
    np.testing.assert_allclose(rpo, plain + 0.5 * np.mean(-pc / lc), rtol=1e-6)
    assert rpo_metrics == plain_metrics


def _pair_batch(rng, batch, prompt, response, vocab):
    """Rows: a prompt then a response; the response tokens (targets) are under the loss mask."""
    out = {}
    length = prompt + response
    for side in dpo.SIDES:
        ids = rng.integers(0, vocab, size=(batch, length + 1)).astype(np.int32)
        mask = np.zeros((batch, length), np.float32)
        mask[:, prompt - 1 :] = 1.0
        out.update(
            {
                f"{side}_inputs": ids[:, :-1],
                f"{side}_targets": ids[:, 1:],
                f"{side}_loss_mask": mask,
                f"{side}_segment_ids": np.ones((batch, length), np.int32),
                f"{side}_positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
            }
        )
    return out


def _direct_summed_logps(model, batch, side):
    """Full logits -> log_softmax -> gather -> masked sum: no chunking, no shared code path."""
    logits = model(jnp.asarray(batch[f"{side}_inputs"]))
    logps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = np.take_along_axis(np.asarray(logps), batch[f"{side}_targets"][..., None], -1)[..., 0]
    return (picked * batch[f"{side}_loss_mask"]).sum(-1)


def test_loss_fn_on_random_models_equals_direct_computation():
    config = QwenConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        initializer_range=0.2,
    )
    policy = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    reference = Qwen2ForCausalLM(config, rngs=nnx.Rngs(1))
    frozen = nnx.to_pure_dict(nnx.state(reference, nnx.Param))
    batch = _pair_batch(np.random.default_rng(0), 4, 5, 7, config.vocab_size)
    dpo_config = dpo.DPOConfig(beta=0.1)
    loss_sum, aux = dpo.make_dpo_loss_fn(dpo_config, chunk_size=4)(policy, batch, frozen)
    metrics = dpo.pair_means(aux)

    pol = {s: _direct_summed_logps(policy, batch, s) for s in dpo.SIDES}
    ref = {s: _direct_summed_logps(reference, batch, s) for s in dpo.SIDES}
    h = (pol["chosen"] - pol["rejected"]) - (ref["chosen"] - ref["rejected"])
    np.testing.assert_allclose(
        loss_sum / aux["weight"], np.mean(np.log1p(np.exp(-0.1 * h))), rtol=1e-5
    )
    rc, rr = 0.1 * (pol["chosen"] - ref["chosen"]), 0.1 * (pol["rejected"] - ref["rejected"])
    expected = {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (rc - rr).mean(),
        "rewards/accuracies": (rc > rr).mean(),
        "logps/chosen": pol["chosen"].mean(),
        "logps/rejected": pol["rejected"].mean(),
    }
    assert aux["weight"] == 4
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0 < expected["rewards/accuracies"] < 1  # the batch exercises both outcomes


def test_config_rejects_unknown_loss():
    with pytest.raises(ValueError, match="loss_type"):
        dpo.DPOConfig(loss_type="kto")
