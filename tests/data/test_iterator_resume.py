"""Iterator state round trips: restored in a fresh process, the next batches are identical."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qwen_jax.data import pipeline

# Built identically here and in the subprocess. The stage switch at step 30 lies between the
# saved step (20) and the end (50), so the restored iterator must also switch on time.
BUILD = """
from qwen_jax.data import pipeline
from qwen_jax.data.config import DataStage, Source
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

def build(demo_dir, packing):
  sources = [Source("text", demo_dir + "/pretrain.jsonl"),
             Source("long", demo_dir + "/long_docs.jsonl")]
  stages = [DataStage("a", 30, 48, 4, {"text": 0.7, "long": 0.3}),
            DataStage("b", None, 96, 2, {"text": 0.3, "long": 0.7})]
  return pipeline.pretrain_iterator(sources, stages, Tokenizer.from_file(DEMO_TOKENIZER_PATH),
                                    seed=7, packing=packing, shard_index=0, shard_count=1)
"""


@pytest.mark.parametrize("packing", ["first_fit", "concat_split"])
def test_resume_in_a_fresh_process(tmp_path, demo_dir, packing):
    scope = {}
    exec(BUILD, scope)  # pylint: disable=exec-used
    it = scope["build"](str(demo_dir), packing)
    batches, state = [], None
    for step in range(50):
        if step == 20:
            state = json.dumps(it.get_state())
        batches.append(next(it))
    it.close()
    (tmp_path / "state.json").write_text(state)
    script = BUILD + textwrap.dedent(f"""
      import json, numpy as np
      it = build({str(demo_dir)!r}, {packing!r})
      it.set_state(json.loads(open({str(tmp_path / "state.json")!r}).read()))
      out = {{}}
      for i in range(30):
        for k, v in next(it).items():
          out[f"{{i}}/{{k}}"] = v
      np.savez({str(tmp_path / "after.npz")!r}, **out)
      it.close()
  """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    after = np.load(tmp_path / "after.npz")
    for i in range(30):
        for k, v in batches[20 + i].items():
            np.testing.assert_array_equal(after[f"{i}/{k}"], v, err_msg=f"batch {21 + i} {k}")


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_sft_and_dpo_resume(demo_dir, demo_tokenizer):
    def sft():
        return pipeline.sft_iterator(
            str(demo_dir / "chat_train.jsonl"),
            demo_tokenizer,
            seq_len=64,
            batch_size=4,
            seed=1,
            system_prompt="Be brief.",
        )

    def dpo():
        return pipeline.dpo_iterator(
            str(demo_dir / "preference_train.jsonl"),
            demo_tokenizer,
            prompt_len=24,
            response_len=8,
            batch_size=4,
            seed=1,
        )

    for make in (sft, dpo):
        it = make()
        _take(it, 7)
        state = it.get_state()
        expected = _take(it, 5)
        fresh = make()
        fresh.set_state(state)
        for a, b in zip(expected, _take(fresh, 5)):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
