"""What a user does with a published checkpoint, through the README's commands verbatim (plus
step and length overrides): import a transformers Qwen2 directory that ships the real Qwen2.5
tokenizer and chat template, SFT on TRL-format conversations, DPO on TRL-format pairs, GRPO on
TRL-format prompts, export, and check the result with transformers alone."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import readme_commands as readme

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCE = "The answer is always forty-two."
CHOSEN, REJECTED = "Happy to help with that.", "Leave me alone now."
TOPICS = [
    "rivers",
    "the moon",
    "bread",
    "trains",
    "music",
    "winter",
    "cats",
    "paper",
    "glass",
    "tea",
    "mountains",
    "clocks",
    "bees",
    "ships",
    "salt",
    "maps",
    "coins",
    "rain",
    "lamps",
    "chess",
    "honey",
    "wool",
    "ink",
    "bridges",
]
SFT_STEPS, DPO_STEPS, GRPO_STEPS, RM_STEPS = 40, 30, 3, 30
# A Qwen2.5-Instruct checkpoint's generation_config.json (stop ids and padding).
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
}


def _questions(offset: int, count: int) -> list[str]:
    templates = [
        "Tell me about {}.",
        "What do you know about {}?",
        "Why do people like {}?",
        "Describe {} in one line.",
    ]
    return [
        templates[i % 4].format(TOPICS[(offset + i) % len(TOPICS)]) + f" (question {offset + i})"
        for i in range(count)
    ]


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def work(tmp_path_factory, qwen_tokenizer_path):
    """A working directory as a user has it: a published checkpoint and their data."""
    work = tmp_path_factory.mktemp("user")
    hf_dir = work / "Qwen2.5-0.5B-Instruct"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=1e6,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_path.parent / name, hf_dir / name)
    (hf_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))

    data = work / "data"
    _write_jsonl(
        data / "sft.jsonl",
        [{"messages": [_user(q), _assistant(SENTENCE)]} for q in _questions(0, 400)],
    )
    _write_jsonl(
        data / "sft_eval.jsonl", [{"prompt": q, "completion": SENTENCE} for q in _questions(200, 8)]
    )
    _write_jsonl(
        data / "pairs.jsonl",
        [
            {"chosen": [_user(q), _assistant(CHOSEN)], "rejected": [_user(q), _assistant(REJECTED)]}
            for q in _questions(1000, 400)
        ],
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "prompt": [_user(q)],
                    "chosen": [_assistant(CHOSEN)],
                    "rejected": [_assistant(REJECTED)],
                }
                for q in _questions(600, 16)
            ]
        ),
        data / "pairs_eval.parquet",
    )
    # GRPO prompts: messages in Parquet (with the answer ExactMatch reads), strings in JSONL.
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": [_user(q)], "answer": CHOSEN} for q in _questions(1400, 16)]
        ),
        data / "prompts.parquet",
    )
    _write_jsonl(
        data / "prompts_eval.jsonl", [{"prompt": q, "answer": CHOSEN} for q in _questions(700, 4)]
    )
    return work


@pytest.fixture(scope="module")
def flow(work):
    """Runs import, SFT, export(SFT), DPO, export(DPO) as the README writes them."""
    readme.run(readme.command("python -m qwen_jax.import_hf"), work)
    sft = readme.run(
        readme.command("python -m qwen_jax.train --gin_file=configs/sft.gin"),
        work,
        f"--gin_param=SFT_STEPS={SFT_STEPS}",
        "--gin_param=SEQ_LEN=64",
        "--gin_param=BATCH_SIZE=4",
        "--gin_param=LEARNING_RATE=1e-2",
    )
    export = readme.command("python -m qwen_jax.export")
    readme.run(
        export, work, f"--checkpoint=runs/sft/checkpoints/{SFT_STEPS}", "--output_dir=hf/sft"
    )
    readme.run(
        readme.command("python -m qwen_jax.train --gin_file=configs/dpo.gin"),
        work,
        f"--gin_param=INIT_FROM='runs/sft/checkpoints/{SFT_STEPS}'",
        "--gin_param=PREFERENCE_EVAL='data/pairs_eval.parquet'",
        f"--gin_param=DPO_STEPS={DPO_STEPS}",
        "--gin_param=SEQ_LEN=96",
        "--gin_param=BATCH_SIZE=4",
        "--gin_param=LEARNING_RATE=1e-3",
    )
    readme.run(
        export, work, f"--checkpoint=runs/dpo/checkpoints/{DPO_STEPS}", "--output_dir=hf/dpo"
    )
    grpo_overrides = (
        f"--gin_param=INIT_FROM='runs/dpo/checkpoints/{DPO_STEPS}'",
        "--gin_param=PROMPTS='data/prompts.parquet'",
        f"--gin_param=GRPO_STEPS={GRPO_STEPS}",
        "--gin_param=BATCH_SIZE=2",
        "--gin_param=MAX_PROMPT_LEN=64",
        "--gin_param=MAX_NEW_TOKENS=8",
        "--gin_param=grpo.GRPOConfig.num_generations=4",
    )
    readme.run(
        readme.command("python -m qwen_jax.train --gin_file=configs/grpo.gin --gin_param"),
        work,
        *grpo_overrides,
    )
    readme.run(
        readme.command("python -m qwen_jax.train --gin_file=configs/reward_model.gin"),
        work,
        f"--gin_param=INIT_FROM='runs/sft/checkpoints/{SFT_STEPS}'",
        "--gin_param=PREFERENCE_EVAL='data/pairs_eval.parquet'",
        f"--gin_param=RM_STEPS={RM_STEPS}",
        "--gin_param=SEQ_LEN=96",
        "--gin_param=BATCH_SIZE=4",
        "--gin_param=LEARNING_RATE=1e-3",
    )
    readme.run(
        export,
        work,
        f"--checkpoint=runs/reward_model/checkpoints/{RM_STEPS}",
        "--output_dir=hf/reward_model",
    )
    readme.run(
        readme.command("python -m qwen_jax.train --gin_file=configs/grpo.gin --workdir"),
        work,
        f"--gin_param=reward_model.RewardModelScore.checkpoint="
        f"'runs/reward_model/checkpoints/{RM_STEPS}'",
        *grpo_overrides,
    )
    (work / "sft.log").write_text(sft.stderr)
    return work


def _load(directory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return tokenizer, model.eval()


def test_without_a_mesh_file_every_device_goes_on_fsdp_and_the_log_says_so(flow):
    assert "no mesh gin file given: using configs/mesh/fsdp.gin" in (flow / "sft.log").read_text()


def test_the_run_used_the_checkpoints_tokenizer(flow, qwen_tokenizer_path):
    run = json.loads((flow / "runs" / "sft" / "run.json").read_text())
    assert run["tokenizer"]["vocab_size"] == 151665
    assert run["tokenizer"]["special_ids"] == {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
    }
    assert run["tokenizer_path"].endswith("ckpt/qwen2.5-0.5b-instruct/tokenizer/tokenizer.json")
    for export in ("sft", "dpo"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (flow / "hf" / export / name).read_bytes() == (
                qwen_tokenizer_path.parent / name
            ).read_bytes(), (export, name)
        generation = json.loads((flow / "hf" / export / "generation_config.json").read_text())
        assert generation["eos_token_id"] == GENERATION_CONFIG["eos_token_id"]


def test_sft_export_answers_held_out_prompts_in_transformers(flow):
    tokenizer, model = _load(flow / "hf" / "sft")
    answers = []
    for question in _questions(200, 8):
        ids = tokenizer.apply_chat_template(
            [_user(question)], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert answers == [SENTENCE] * 8, answers


def _margins(directory, questions) -> np.ndarray:
    """log p(chosen | prompt) - log p(rejected | prompt), computed by transformers."""
    tokenizer, model = _load(directory)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    margins = []
    for question in questions:
        prompt = list(
            tokenizer.apply_chat_template(
                [_user(question)], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        logps = []
        for response in (CHOSEN, REJECTED):
            answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1]
            picked = torch.log_softmax(logits, -1)[torch.arange(len(answer)), answer]
            logps.append(float(picked.sum()))
        margins.append(logps[0] - logps[1])
    return np.asarray(margins)


def test_dpo_raises_the_margin_of_chosen_over_rejected_on_held_out_pairs(flow):
    questions = _questions(600, 16)
    before, after = (
        _margins(flow / "hf" / "sft", questions),
        _margins(flow / "hf" / "dpo", questions),
    )
    assert np.all(after > before), (before, after)
    assert after.mean() > before.mean() + 1.0, (before.mean(), after.mean())


def test_grpo_samples_the_imported_checkpoints_chat_and_logs_trl_metrics(flow):
    """GRPO from the DPO step with the checkpoint's own tokenizer and chat template: the
    exact-match reward reads the Parquet records' `answer`, and the evaluation scores the JSONL
    prompts' greedy completions."""
    run_dir = flow / "runs" / "grpo"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert train[-1]["step"] == GRPO_STEPS and evals[-1]["step"] == GRPO_STEPS
    assert 0 <= train[-1]["rewards/exact_match/mean"] <= 1
    assert 0 < train[-1]["completions/mean_length"] <= 8  # MAX_NEW_TOKENS
    assert 0 <= evals[-1]["rewards/exact_match"] <= 1
    run = json.loads((run_dir / "run.json").read_text())
    assert run["task"] == "grpo" and run["tokenizer"]["vocab_size"] == 151665


def test_reward_model_export_prefers_chosen_in_transformers(flow):
    """The reward model trained from the SFT step, exported, then read by transformers alone:
    its classifier scores `apply_chat_template`'s output of each held-out pair (a padded batch),
    whose tokens are those it trained on, and prefers the chosen answer every time."""
    from qwen_jax.data import examples
    from qwen_jax.data.chat import render_chat
    from qwen_jax.data.tokenizer import Tokenizer

    directory = flow / "hf" / "reward_model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=torch.float32
    ).eval()
    assert type(model) is transformers.Qwen2ForSequenceClassification
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    ours = Tokenizer.from_file(directory / "tokenizer.json")
    questions = _questions(600, 16)
    scores = {}
    for response in (CHOSEN, REJECTED):
        conversations = [[_user(q), _assistant(response)] for q in questions]
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        for text, conversation in zip(texts[:2], conversations[:2]):
            prompt, _ = render_chat(conversation[:1], ours, add_generation_prompt=True)
            row = examples.response_example(ours, prompt, response, shift=False)
            assert row["inputs"].tolist() == tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            scores[response] = model(**batch).logits[:, 0].numpy()
    assert np.all(scores[CHOSEN] > scores[REJECTED]), scores
    run = flow / "runs" / "reward_model"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in evals if r["split"] == "eval"][-1] == 1.0


def test_grpo_is_rewarded_by_the_reward_model(flow):
    records = [
        json.loads(line)
        for line in (flow / "runs" / "grpo_reward_model" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["step"] == GRPO_STEPS
    assert all(np.isfinite(r["rewards/reward_model/mean"]) for r in train)


def test_the_demo_tokenizer_is_refused_for_the_imported_checkpoint(flow):
    from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

    result = readme.run(
        readme.command("python -m qwen_jax.train --gin_file=configs/sft.gin"),
        flow,
        f"--gin_param=setup.RunConfig.tokenizer_path='{DEMO_TOKENIZER_PATH}'",
        "--workdir=runs/refused",
        check=False,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "does not belong to the model" in errors[0] and "eos_token_id is 151645" in errors[0]
    assert not (flow / "runs" / "refused").exists()
