"""The Qwen2.5 architecture as one frozen dataclass, convertible to and from HF `config.json`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Qwen2.5 checkpoints pad the tokenizer's 151,665 ids to a multiple of 128.
QWEN2_5_VOCAB_SIZE = 151_936
HF_ARCHITECTURE = "Qwen2ForCausalLM"
# The same decoder with a linear `score` head read at each sequence's last token (reward models).
HF_CLASSIFIER_ARCHITECTURE = "Qwen2ForSequenceClassification"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN scaling as transformers reads it from `rope_scaling` (how Qwen2.5 serves 128K tokens)."""

    factor: float = 4.0
    original_max_position_embeddings: int = 32_768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    type: str = "yarn"

    def __post_init__(self):
        if self.type != "yarn":
            raise ValueError(f"rope_scaling.type={self.type!r}: only 'yarn' is supported")
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be >= 1")

    @property
    def attention_factor(self) -> float:
        # The YaRN paper's mscale; transformers applies it to cos and sin.
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0

    def to_hf(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "rope_type": self.type,
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Architecture hyperparameters; field names follow transformers' `Qwen2Config`."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = QWEN2_5_VOCAB_SIZE
    head_dim: int | None = None
    max_position_embeddings: int = 32_768
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 151_643
    eos_token_id: int = 151_643
    # None: a causal LM (`Qwen2ForCausalLM`); n: a sequence classifier with n outputs
    # (`Qwen2ForSequenceClassification`; a reward model has 1).
    num_labels: int | None = None
    # transformers' classifier reads its score at the last token that is not this id; kept so
    # an export scores as it does here (qwen_jax itself reads the last non-padding position).
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"QwenConfig.{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"QwenConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"QwenConfig: hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"QwenConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0:
            raise ValueError(f"QwenConfig.rope_theta={self.rope_theta} must be positive")
        if self.num_labels is not None and (
            not isinstance(self.num_labels, int) or self.num_labels <= 0
        ):
            raise ValueError(
                f"QwenConfig.num_labels={self.num_labels!r} must be a positive integer"
            )

    @property
    def architecture(self) -> str:
        return HF_ARCHITECTURE if self.num_labels is None else HF_CLASSIFIER_ARCHITECTURE

    def replace(self, **changes) -> "QwenConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "QwenConfig":
        """Builds the config from a transformers Qwen2 `config.json` dict (v4 or v5 layout)."""
        architectures = hf.get("architectures") or [HF_ARCHITECTURE]
        known = (HF_ARCHITECTURE, HF_CLASSIFIER_ARCHITECTURE)
        if hf.get("model_type", "qwen2") != "qwen2" or not set(known) & set(architectures):
            raise ValueError(
                f"{source}: unsupported architecture model_type={hf.get('model_type')!r} "
                f"architectures={architectures!r}; qwen_jax reads {' and '.join(known)} "
                f"(model_type 'qwen2')"
            )
        num_labels = pad_token_id = None
        if HF_CLASSIFIER_ARCHITECTURE in architectures:
            # transformers derives num_labels from id2label (2 when neither is given).
            num_labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
            pad_token_id = hf.get("pad_token_id")
        if hf.get("use_sliding_window"):
            raise ValueError(
                f"{source}: use_sliding_window=true is not supported (Qwen2.5 does not use it)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; Qwen2.5 uses 'silu'")
        # transformers v5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        scaling_type = (
            legacy_scaling.get("type") or legacy_scaling.get("rope_type") or rope.get("rope_type")
        )
        scaling = None
        if scaling_type not in (None, "default"):
            params = legacy_scaling or rope
            if scaling_type != "yarn":
                raise ValueError(
                    f"{source}: rope scaling type {scaling_type!r} is not supported (only yarn)"
                )
            scaling = RopeScaling(
                factor=float(params["factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0),
            )
        eos = hf.get("eos_token_id", 151_643)
        try:
            return cls(
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                vocab_size=hf["vocab_size"],
                head_dim=hf.get("head_dim"),
                max_position_embeddings=hf.get("max_position_embeddings", 32_768),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                initializer_range=hf.get("initializer_range", 0.02),
                bos_token_id=hf.get("bos_token_id") or 151_643,
                eos_token_id=eos[0] if isinstance(eos, list) else (eos or 151_643),
                num_labels=num_labels,
                pad_token_id=pad_token_id,
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """Every field of a transformers `Qwen2Config`, readable by transformers v4 and v5."""
        hf = {
            "architectures": [self.architecture],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            hf["head_dim"] = self.head_dim
        if self.num_labels is not None:
            labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            hf["id2label"] = labels
            hf["label2id"] = {name: int(i) for i, name in labels.items()}
            hf["pad_token_id"] = self.pad_token_id
        return hf


def parameter_count(config: QwenConfig) -> int:
    """Closed-form parameter count; `model_info` checks it against the abstract model."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = h * q + q + 2 * (h * kv + kv) + q * h
    mlp = 3 * h * config.intermediate_size
    layer = attention + mlp + 2 * h
    if config.num_labels is not None:  # the score head replaces the output projection
        embeddings = config.vocab_size * h + h * config.num_labels
    else:
        embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * layer + embeddings + h


def model_flops_per_token(config: QwenConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per trained token: 6 per matmul weight, plus causal attention scores.

    The input embedding is a lookup, not a matmul, so it is excluded unless it is tied to the
    output projection. Attention: QK^T and PV are 2 matmuls of 2*T*H*D FLOPs per token each,
    halved by the causal mask, times 3 for forward+backward.
    """
    matmul_params = parameter_count(config)
    if not config.tie_word_embeddings or config.num_labels is not None:
        matmul_params -= config.vocab_size * config.hidden_size
    attention = (
        6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    )
    return 6 * matmul_params + attention
