"""Group Relative Policy Optimization: the advantages, loss and metrics of TRL's `GRPOTrainer`,
as pure functions, with TRL's names so that runs compare.

For each prompt, G completions are sampled; a completion i with reward r_i gets the advantage
  A_i = r_i - mean(group)                                   scale_rewards='none'
  A_i = (r_i - mean(group)) / (std(group) + 1e-4)           'group' (std with Bessel's correction)
  A_i = (r_i - mean(group)) / (std(batch) + 1e-4)           'batch'
and each completion token t the loss
  l_t = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps_high) A_i) + beta * kl_t,
  rho_t = exp(logp_t - old_logp_t),   kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (k3)
where old log-probs are those of the parameters that sampled (with one update per generation
batch, `num_iterations=1`, they equal the current ones and rho is 1, as TRL has it). Log-probs are
taken under the logits divided by the sampling temperature, as TRL does. Aggregation over the
completion tokens (mask m):
  grpo:     mean over completions of (sum_t m l_t / sum_t m)
  dr_grpo:  sum m l / (completions * max_completion_length)
  dapo:     sum m l / sum m, over the whole generation batch (TRL's default)
Metrics (token means over completion tokens): `entropy`, `kl`, `clip_ratio/low_mean` (rho below
1 - eps where A < 0), `clip_ratio/high_mean` (above 1 + eps_high where A > 0),
`clip_ratio/region_mean` (either).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.train.loss import token_logprobs

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets zero advantages, not NaN
# Token-summed metrics of the loss, logged divided by the completion tokens.
TOKEN_METRICS = (
    "entropy",
    "kl",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The loss and its advantages (TRL's `GRPOConfig` names and defaults)."""

    num_generations: int = 8  # G: completions sampled per prompt
    beta: float = 0.0  # KL weight; 0 keeps no reference model
    epsilon: float = 0.2  # ratio clipping below (and above, unless epsilon_high)
    epsilon_high: float | None = None  # DAPO's clip-higher (e.g. 0.28)
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1  # updates per generation batch

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type={self.loss_type!r}; choose one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"GRPOConfig.scale_rewards={self.scale_rewards!r}; choose one of {SCALE_REWARDS}"
            )
        if self.num_generations < 2:
            raise ValueError(
                f"GRPOConfig.num_generations={self.num_generations}: a group needs >= 2 "
                f"completions to compare"
            )
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high or 1) <= 0:
            raise ValueError("GRPOConfig: beta must be >= 0, epsilon and epsilon_high > 0")
        if self.num_iterations < 1:
            raise ValueError(f"GRPOConfig.num_iterations={self.num_iterations} must be >= 1")

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def combine_rewards(per_function: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[N] rewards from [N, F] per-function rewards: the weighted sum, a function's NaN (it does
    not apply to that completion) counting as absent, as TRL's `nansum`."""
    return np.nansum(per_function * weights[None, :], axis=1)


def advantages(rewards: np.ndarray, config: GRPOConfig) -> tuple[np.ndarray, dict]:
    """([N] advantages, batch statistics) for rewards [N] of N / G groups of consecutive
    completions. Statistics: `reward` (mean), `reward_std` (the mean of the std the advantages
    were scaled by, the group std when unscaled), `frac_reward_zero_std`."""
    groups = np.asarray(rewards, np.float64).reshape(-1, config.num_generations)
    mean = np.repeat(groups.mean(axis=1), config.num_generations)
    if config.scale_rewards == "batch":
        std = np.full(mean.shape, groups.std(ddof=1))
    else:
        std = np.repeat(groups.std(axis=1, ddof=1), config.num_generations)
    centred = groups.reshape(-1) - mean
    scaled = centred if config.scale_rewards == "none" else centred / (std + STD_EPS)
    stats = {
        "reward": float(mean.mean()),
        "reward_std": float(std.mean()),
        "frac_reward_zero_std": float(np.mean(np.isclose(std, 0.0))),
    }
    return scaled.astype(np.float32), stats


def token_terms(config: GRPOConfig, logps, old_logps, ref_logps, advantages_) -> dict:
    """Per-token loss and indicator terms [N, T] (before masking); `ref_logps` None when beta=0."""
    adv = advantages_[:, None]
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1 - config.epsilon, 1 + config.upper_epsilon)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    terms = {}
    if config.beta:
        delta = ref_logps - logps
        terms["kl"] = jnp.exp(delta) - delta - 1
        loss = loss + config.beta * terms["kl"]
    low = (ratio < 1 - config.epsilon) & (adv < 0)
    high = (ratio > 1 + config.upper_epsilon) & (adv > 0)
    terms["clip_ratio/low_mean"] = low.astype(jnp.float32)
    terms["clip_ratio/high_mean"] = high.astype(jnp.float32)
    terms["clip_ratio/region_mean"] = (low | high).astype(jnp.float32)
    return {"loss": loss, **terms}


def completion_logprobs(model, batch: dict, *, temperature: float, chunk_size: int):
    """(log-probs, entropies), [N, T] each, of every row's targets under `model` at the sampling
    temperature; only positions under `completion_mask` mean anything."""
    hidden, _ = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    return token_logprobs(
        hidden,
        model.output_kernel(),
        batch["targets"],
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=True,
    )


def make_grpo_loss_fn(
    config: GRPOConfig, *, max_completion_length: int, temperature: float, chunk_size: int = 1024
):
    """`loss_fn(model, batch, frozen) -> (loss_sum, aux)` in the train step's contract (sums,
    normalized by `aux["weight"]`: completions for grpo and dr_grpo, completion tokens for dapo,
    so microbatches and devices give the generation batch's loss exactly).

    The batch: `inputs`, `targets`, `positions`, `segment_ids` [N, T] (prompt and completion),
    `completion_mask` [N, T] (targets that are completion tokens), `advantages` [N], and
    `old_logps` (num_iterations > 1) and `ref_logps` (beta > 0) [N, T], computed when sampling.
    """

    def loss_fn(model, batch, frozen):
        del frozen  # the reference's log-probs come with the batch
        logps, entropy = completion_logprobs(
            model, batch, temperature=temperature, chunk_size=chunk_size
        )
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        terms = token_terms(config, logps, old, batch.get("ref_logps"), batch["advantages"])
        mask = batch["completion_mask"].astype(jnp.float32)
        masked = terms.pop("loss") * mask
        completions = jnp.float32(mask.shape[0])
        if config.loss_type == "grpo":
            loss_sum = jnp.sum(masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0))
            weight = completions
        elif config.loss_type == "dr_grpo":
            loss_sum, weight = masked.sum() / max_completion_length, completions
        else:
            loss_sum, weight = masked.sum(), mask.sum()
        terms["entropy"] = jax.lax.stop_gradient(entropy)
        aux = {k: jnp.sum(v * mask) for k, v in terms.items()}
        aux["completion_tokens"] = mask.sum()
        aux["tokens"] = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
        return loss_sum, {"weight": weight, **aux}

    return loss_fn


def step_means(metrics: dict) -> dict:
    """A step's token-summed metrics as token means (TRL's `masked_batch_mean`)."""
    tokens = metrics["completion_tokens"]
    return {k: (v / tokens if k in TOKEN_METRICS else v) for k, v in metrics.items()}
