"""Direct Preference Optimization: the losses and metrics of TRL's `DPOTrainer`, as pure functions.

Everything here works on per-sequence summed log-probabilities of the chosen and rejected
responses under the policy and the frozen reference, so the definitions can be checked against a
direct computation (tests/train/test_dpo.py) and reused by any model.

Definitions (TRL's `loss_type` names; h = (pi_c - pi_r) - (ref_c - ref_r), eps = label smoothing):
  sigmoid: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)        (eps=0: the DPO paper)
  robust:  (-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
  hinge:   relu(1 - beta h)
  ipo:     (h - 1/(2 beta))^2, with log-probs averaged over response tokens as TRL does
Rewards are beta * (policy - reference) log-probs (summed, also for IPO) per response.
rpo_alpha (TRL's name; RPO, Pang et al. 2024): adds alpha times the chosen response's negative
log-likelihood per token, which keeps DPO from lowering the chosen answer's probability along
with the rejected one's. TRL averages that NLL over all chosen tokens of the batch; here it is
averaged per pair, then over pairs, so that it sums over pairs like every other term (exact
under gradient accumulation and data parallelism); the two agree when responses have equal
lengths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.train.loss import token_logprobs

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type={self.loss_type!r}; choose one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta={self.beta} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"DPOConfig.label_smoothing={self.label_smoothing} must be in [0, 0.5)"
            )
        if self.label_smoothing and self.loss_type in ("hinge", "ipo"):
            raise ValueError(
                f"DPOConfig: label_smoothing has no meaning for loss_type={self.loss_type!r}"
            )
        if self.rpo_alpha < 0:
            raise ValueError(f"DPOConfig.rpo_alpha={self.rpo_alpha} must be >= 0")


def preference_loss(config: DPOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """Per-example losses [B] from the log-probs the chosen loss type compares."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    beta, eps = config.beta, config.label_smoothing
    if config.loss_type == "sigmoid":
        return -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    if config.loss_type == "robust":
        return (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    if config.loss_type == "hinge":
        return jax.nn.relu(1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


def dpo_terms(config: DPOConfig, policy: dict, reference: dict, lengths: dict) -> dict:
    """Per-pair loss and TRL's per-pair metrics, each [B].

    `policy`, `reference`: {'chosen': [B], 'rejected': [B]} summed response log-probs;
    `lengths`: {'chosen': [B], 'rejected': [B]} response token counts (for IPO and RPO).
    """
    if config.loss_type == "ipo":
        compared = {
            name: {s: logps[s] / jnp.maximum(lengths[s], 1) for s in SIDES}
            for name, logps in (("policy", policy), ("reference", reference))
        }
    else:
        compared = {"policy": policy, "reference": reference}
    losses = preference_loss(
        config,
        compared["policy"]["chosen"],
        compared["policy"]["rejected"],
        compared["reference"]["chosen"],
        compared["reference"]["rejected"],
    )
    if config.rpo_alpha:
        losses = losses - config.rpo_alpha * policy["chosen"] / jnp.maximum(lengths["chosen"], 1)
    chosen_rewards = config.beta * (policy["chosen"] - reference["chosen"])
    rejected_rewards = config.beta * (policy["rejected"] - reference["rejected"])
    return {
        "loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        # Strict: a tie (e.g. at step 0, where both rewards are 0) is not a win.
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy["chosen"],
        "logps/rejected": policy["rejected"],
    }


def dpo_loss_and_metrics(config: DPOConfig, policy: dict, reference: dict, lengths: dict):
    """(mean loss, {metric: batch mean}) as TRL reports them for one batch."""
    terms = dpo_terms(config, policy, reference, lengths)
    loss = terms.pop("loss")
    return loss.mean(), {k: v.mean() for k, v in terms.items()}


def sequence_logprobs(model, batch: dict, *, chunk_size: int) -> tuple[dict, dict]:
    """Summed response log-probs and response lengths, {'chosen': [B], 'rejected': [B]} each.

    Chosen and rejected rows go through the model as one batch of 2B rows (one forward pass);
    only tokens under `<side>_loss_mask` (the response) count.
    """

    def both(key):
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)

    hidden, _ = model.hidden_states(both("inputs"), both("positions"), both("segment_ids"))
    logps = token_logprobs(hidden, model.output_kernel(), both("targets"), chunk_size=chunk_size)
    mask = both("loss_mask").astype(jnp.float32)
    summed, lengths = (logps * mask).sum(-1), mask.sum(-1)
    half = batch["chosen_inputs"].shape[0]
    return (
        {"chosen": summed[:half], "rejected": summed[half:]},
        {"chosen": lengths[:half], "rejected": lengths[half:]},
    )


PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def make_dpo_loss_fn(config: DPOConfig, *, chunk_size: int = 2048):
    """`loss_fn(model, batch, frozen) -> (loss_sum, aux)` in the train step's contract: sums over
    the pairs, `aux["weight"]` = the number of pairs (so microbatches and devices average right);
    `frozen` holds the reference parameters (a pure dict shaped like the policy's), unless the
    batch carries precomputed `reference_chosen_logps` and `reference_rejected_logps` [B].
    `pair_means` turns the summed metrics back into TRL's per-batch means."""

    def loss_fn(model, batch, frozen):
        if "reference_chosen_logps" in batch:
            reference = {s: batch[f"reference_{s}_logps"] for s in SIDES}
        else:
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda x: x, state)  # a copy, so the policy's state is untouched
            nnx.replace_by_pure_dict(state, frozen)
            reference, _ = sequence_logprobs(
                nnx.merge(graphdef, state), batch, chunk_size=chunk_size
            )
            reference = jax.lax.stop_gradient(reference)
        policy, lengths = sequence_logprobs(model, batch, chunk_size=chunk_size)
        terms = dpo_terms(config, policy, reference, lengths)
        # Rows with an empty response are padding (the last batch of an eval pass).
        real = (lengths["chosen"] > 0).astype(jnp.float32)
        tokens = sum(jnp.sum((batch[f"{s}_segment_ids"] != 0).astype(jnp.float32)) for s in SIDES)
        sums = {k: jnp.sum(v * real) for k, v in terms.items()}
        return sums.pop("loss"), {"weight": jnp.sum(real), "tokens": tokens, **sums}

    return loss_fn


def pair_means(metrics: dict, names=PAIR_METRICS) -> dict:
    """Divides the summed pair metrics `names` of a step by its number of pairs."""
    return {k: (v / metrics["weight"] if k in names else v) for k, v in metrics.items()}
