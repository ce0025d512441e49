"""qwen_jax: a JAX/Flax training stack for the Qwen2.5 model family."""

__version__ = "0.1.0"
