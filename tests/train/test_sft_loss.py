"""SFT: the loss counts exactly the assistant tokens of a rendered conversation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.data import pipeline
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH as DEMO_TOKENIZER
from qwen_jax.train.step import lm_loss_fn

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "19"},
        {"role": "user", "content": "What is the capital of Zorvia?"},
        {"role": "assistant", "content": "Marlotin"},
    ]
}


def test_loss_counts_only_assistant_tokens(tmp_path):
    tokenizer = Tokenizer.from_file(DEMO_TOKENIZER)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    batch = next(
        pipeline.sft_iterator(
            str(path),
            tokenizer,
            seq_len=128,
            batch_size=1,
            for_eval=True,
            system_prompt="You are a helpful assistant.",
        )
    )
    # The learned targets, read back as text: each assistant answer followed by <|im_end|>.
    targets = batch["targets"][0][batch["loss_mask"][0] > 0]
    assert tokenizer.decode(targets) == "19<|im_end|>Marlotin<|im_end|>"
    expected_count = len(tokenizer.encode("19")) + len(tokenizer.encode("Marlotin")) + 2

    config = QwenConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=768,
    )
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_sum, aux = lm_loss_fn(model, device_batch, chunk_size=32)
    assert aux["weight"] == expected_count

    # Direct computation: full logits, log-softmax, summed over the assistant positions only.
    logits = model(device_batch["inputs"], device_batch["positions"], device_batch["segment_ids"])
    logps = jax.nn.log_softmax(logits, axis=-1)[0]
    picked = np.take_along_axis(np.asarray(logps), batch["targets"][0][:, None], -1)[:, 0]
    np.testing.assert_allclose(loss_sum, -(picked * batch["loss_mask"][0]).sum(), rtol=1e-5)
