"""Data pipelines: sources, tokenizer, ChatML, packing, mixtures and stages, SFT and DPO.

Entry points live in `qwen_jax.data.pipeline`; see BUILD_NOTES.md ("Input pipelines") for the interfaces.
"""
