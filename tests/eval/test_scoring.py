"""The batched scorer behind the lm-eval model: each row's answer equals a direct forward pass on
that row alone, whatever the batching, padding and length buckets; sharded over the 8-device
CPU mesh it equals one device."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "parallel"))
from sharding_fixtures import CONFIG, factory, rules_from_gin  # noqa: E402

from qwen_jax.eval.scoring import Scorer, bucket  # noqa: E402
from qwen_jax.model.generate import Sampling  # noqa: E402
from qwen_jax.parallel import host_data  # noqa: E402
from qwen_jax.parallel import mesh as mesh_lib  # noqa: E402

PAD = 0


def _rows(count=7, seed=0):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, CONFIG.vocab_size, rng.integers(2, 40)).tolist() for _ in range(count)]
    lengths = [int(rng.integers(1, len(r))) for r in rows]
    return rows, lengths


def _direct(model, row, n):
    """log p of the last n tokens of row and whether each is the argmax, one unpadded row."""
    ids = np.asarray(row, np.int32)[None]
    logits = np.asarray(model(ids[:, :-1]), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logps = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = ids[0, 1:]
    picked = logps[np.arange(len(targets)), targets][-n:]
    greedy = (logits.argmax(-1) == targets)[-n:]
    return picked.sum(), bool(greedy.all())


@pytest.fixture(scope="module")
def model():
    return factory()()


def test_bucket():
    lengths = (1, 16, 17, 33, 100, 128, 129, 1000, 2049)
    assert [bucket(n) for n in lengths] == [16, 16, 32, 48, 112, 128, 160, 1024, 2560]


def test_each_answer_equals_a_direct_forward_pass(model):
    rows, lengths = _rows()
    # Continuations the model would produce greedily, so that both flags occur.
    greedy_row = rows[0][:5]
    for _ in range(3):
        greedy_row.append(
            int(np.asarray(model(np.asarray([greedy_row], np.int32)))[0, -1].argmax())
        )
    rows.append(greedy_row)
    lengths.append(3)
    answers = Scorer(model, batch_size=4, pad_id=PAD, show_progress=False).continuation_logprobs(
        rows, lengths
    )
    flags = []
    for (logp, greedy), row, n in zip(answers, rows, lengths):
        want_logp, want_greedy = _direct(model, row, n)
        assert logp == pytest.approx(want_logp, abs=1e-4)
        assert greedy == want_greedy
        flags.append(greedy)
    assert True in flags and False in flags


def test_sharded_scoring_and_generation_equal_one_device(model):
    rows, lengths = _rows(seed=1)
    one = Scorer(model, batch_size=8, pad_id=PAD, show_progress=False)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=4))
    rules = rules_from_gin()
    graphdef, state = nnx.split(model)
    shardings = mesh_lib.param_shardings(state, mesh, rules)
    nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), shardings))
    sharded_model = nnx.merge(graphdef, state)
    sharded = Scorer(
        sharded_model,
        batch_size=8,
        pad_id=PAD,
        placement=host_data.Placement(mesh, rules),
        show_progress=False,
    )
    for (a, ga), (b, gb) in zip(
        one.continuation_logprobs(rows, lengths), sharded.continuation_logprobs(rows, lengths)
    ):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb  # sums over up to 40 tokens
    prompts = [r[:7] for r in rows]
    kwargs = dict(max_new_tokens=5, stop_tokens=[1], sampling=Sampling(), rng=jax.random.key(0))
    assert one.generate(prompts, **kwargs) == sharded.generate(prompts, **kwargs)
