"""qwen_jax as an lm-evaluation-harness model: `--model qwen_jax --model_args pretrained=DIR,...`.

It answers lm-eval's three request types as its Hugging Face backend (`--model hf`) does, so the
two agree request for request: the same tokenizer (transformers' `AutoTokenizer` over the
checkpoint's own files), the same empty-context prefix token, the same left truncation to
`max_length`, continuation log-probs summed in float32 with the greedy flag from the argmax,
rolling windows from lm-eval's own `get_rolling_token_windows`, and generations decoded without
special tokens and cut at the first stop sequence. The model runs on the mesh (`scoring.Scorer`).

Model arguments (besides lm-eval's `batch_size`):
  pretrained      a Hugging Face directory (config.json + safetensors) or a qwen_jax checkpoint
                  (import_hf's output or a training step directory)
  dtype           float32 (default) or bfloat16: parameters and compute
  tokenizer       a tokenizer directory; default: the checkpoint's own
  max_length      context length; default: the model's `max_position_embeddings`
  max_gen_toks    new tokens when a task gives no limit (256, as lm-eval's hf model)
  mesh            a mesh gin file (default configs/mesh/fsdp.gin: every device on fsdp)
  seed            the sampling seed (greedy decoding uses none)
"""

from __future__ import annotations

import collections
import json
import os
import types

import jax
import lm_eval.models  # noqa: F401  (lm-eval's own models stay registered beside ours)
from absl import logging
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from qwen_jax.checkpoint import pretrained as pretrained_lib
from qwen_jax.convert import hf as hf_convert
from qwen_jax.data import tokenizer as tokenizer_lib
from qwen_jax.eval.scoring import Scorer
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.generate import Sampling
from qwen_jax.model.layers import Runtime
from qwen_jax.parallel import host_data
from qwen_jax.train import run_tokenizer

MODEL_NAME = "qwen_jax"
DEFAULT_BATCH_SIZE = 8
# What transformers samples with when neither the task nor generation_config.json says.
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
_SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


def _stop_ids(directory: str, config: QwenConfig) -> list[int]:
    """Where transformers' `generate` stops: generation_config.json's eos ids, else the
    model's."""
    settings = _generation_settings(directory)
    ids = settings.get("eos_token_id", config.eos_token_id)
    return [ids] if isinstance(ids, int) else list(ids)


def _generation_settings(directory: str | None) -> dict:
    """The checkpoint's generation_config.json (stop ids, sampling defaults); {} without one."""
    path = os.path.join(directory or "", hf_convert.GENERATION_CONFIG)
    if directory is None or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(directory: str | None, config: QwenConfig, what: str):
    """transformers' tokenizer from `directory`, refused in one line when it cannot belong to
    the model (more ids than the vocabulary, or other control tokens)."""
    import transformers

    if directory is None or not os.path.isfile(
        os.path.join(directory, tokenizer_lib.TOKENIZER_JSON)
    ):
        raise FileNotFoundError(
            f"{what}: no {tokenizer_lib.TOKENIZER_JSON}; name a tokenizer directory with "
            f"--model_args ...,tokenizer=DIR"
        )
    path = os.path.join(directory, tokenizer_lib.TOKENIZER_JSON)
    try:
        ours = tokenizer_lib.Tokenizer.from_file(path)
    except ValueError as e:
        raise ValueError(f"tokenizer {path} does not belong to the model: {e}") from None
    run_tokenizer.check(ours, path, config, None)
    return transformers.AutoTokenizer.from_pretrained(directory)


@register_model(MODEL_NAME)
class QwenJaxLM(TemplateLM):
    """lm-eval's model interface over a qwen_jax model (see the module docstring)."""

    def __init__(
        self,
        pretrained: str,
        dtype: str = "float32",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        tokenizer: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        mesh: str | None = None,
        seed: int = 0,
        device: str | None = None,
        max_batch_size: int | None = None,
    ):
        super().__init__()
        del max_batch_size  # batches have a fixed size: one compiled program per length bucket
        if device is not None:
            logging.info("device=%s ignored: JAX places the model on the mesh's devices", device)
        if str(batch_size).startswith("auto"):
            logging.info("batch_size=%s: using %d", batch_size, DEFAULT_BATCH_SIZE)
            batch_size = DEFAULT_BATCH_SIZE
        from qwen_jax import cli, configurables

        cli.parse_gin([mesh or cli.DEFAULT_MESH_FILE], [])
        placement = host_data.Placement(*configurables.mesh_and_rules())
        model, config, tokenizer_dir = pretrained_lib.load(
            pretrained,
            Runtime(dtype=dtype, param_dtype=dtype),
            placement,
            what=f"pretrained={pretrained}",
        )
        self.pretrained, self.dtype = pretrained, dtype
        self._setup(
            model,
            config,
            tokenizer or tokenizer_dir,
            placement,
            generation_dir=tokenizer_dir,  # the model's own, whichever tokenizer reads the text
            batch_size=int(batch_size),
            max_length=max_length,
            max_gen_toks=max_gen_toks,
            seed=seed,
            what=f"pretrained={pretrained}",
        )

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer_dir: str,
        placement: host_data.Placement | None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        seed: int = 0,
    ) -> "QwenJaxLM":
        """An lm-eval model over a model already in memory (the training loop's parameters)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm.pretrained, lm.dtype = "<in memory>", model.runtime.dtype
        lm._setup(
            model,
            model.config,
            tokenizer_dir,
            placement,
            generation_dir=tokenizer_dir,
            batch_size=batch_size,
            max_length=max_length,
            max_gen_toks=256,
            seed=seed,
            what=tokenizer_dir,
            show_progress=False,
        )
        return lm

    def _setup(
        self,
        model,
        config,
        tokenizer_dir,
        placement,
        *,
        generation_dir,
        batch_size,
        max_length,
        max_gen_toks,
        seed,
        what,
        show_progress=True,
    ):
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer_dir, config, what)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.stop_ids = _stop_ids(generation_dir, config)
        self.sampling_defaults = {
            k: v for k, v in _generation_settings(generation_dir).items() if k in _SAMPLING_KWARGS
        }
        self.rng = jax.random.key(int(seed))
        pad = self.tokenizer.pad_token_id
        self.scorer = Scorer(
            model,
            batch_size=batch_size,
            pad_id=self.eot_token_id if pad is None else pad,
            placement=placement,
            show_progress=show_progress and jax.process_index() == 0,
        )
        self.num_parameters = sum(x.size for x in jax.tree.leaves(self.scorer.state))

    # --- what lm-eval reads -------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return model_utils.resolve_max_length(
            types.SimpleNamespace(**self.config.to_hf_config()), self.tokenizer
        )

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": int(self.num_parameters), "model_dtype": self.dtype}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # --- the three request types --------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows, lengths = [], []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than "
                    f"max_length={self.max_length}"
                )
            rows.append((context + continuation)[-(self.max_length + 1) :])
            lengths.append(len(continuation))
        answers = self.scorer.continuation_logprobs(rows, lengths, "loglikelihood requests")
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for number, (text,) in enumerate(req.args for req in requests):
            for context, predicted in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, predicted))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        by_kwargs = collections.defaultdict(list)
        for number, req in enumerate(requests):
            by_kwargs[json.dumps(req.args[1], sort_keys=True)].append(number)
        results = [""] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for group in by_kwargs.values():
            kwargs = model_utils.normalize_gen_kwargs(requests[group[0]].args[1], self.max_gen_toks)
            until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for a prompt in "
                    f"max_length={self.max_length}"
                )
            sampling = self._sampling(kwargs)
            prompts = [
                self.tok_encode(requests[n].args[0])[-(self.max_length - max_new) :] for n in group
            ]
            self.rng, rng = jax.random.split(self.rng)
            outputs = self.scorer.generate(
                prompts,
                max_new_tokens=max_new,
                stop_tokens=self.stop_ids + self._single_token_stops(until),
                sampling=sampling,
                rng=rng,
                desc="generate_until requests",
            )
            for n, tokens in zip(group, outputs):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                results[n] = model_utils.postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[n].args, results[n])
        return results

    def _sampling(self, kwargs: dict) -> Sampling:
        unknown = sorted(set(kwargs) - set(_SAMPLING_KWARGS))
        if unknown:
            raise ValueError(
                f"generation arguments {unknown} are not supported by --model {MODEL_NAME} "
                f"(it takes until, max_gen_toks, {', '.join(_SAMPLING_KWARGS)})"
            )
        if not kwargs.get("do_sample"):
            return Sampling()
        settings = {**_HF_SAMPLING_DEFAULTS, **self.sampling_defaults}
        temperature = float(kwargs.get("temperature") or settings["temperature"])
        return Sampling(
            temperature=temperature,
            top_k=int(kwargs.get("top_k", settings["top_k"]) or 0),
            top_p=float(kwargs.get("top_p", settings["top_p"])),
        )

    def _single_token_stops(self, until: list[str]) -> list[int]:
        """Ids of stop sequences that are one ordinary token: generation may end at them, since
        the text is cut at the first stop sequence anyway (longer ones are cut afterwards)."""
        special = set(self.tokenizer.all_special_ids)
        ids = []
        for text in until:
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in special:
                ids.append(encoded[0])
        return ids
