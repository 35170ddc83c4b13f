"""lm-evaluation-harness's model type "sft_jax": an lm-eval `LM` over a CausalLM of ours.

`lm_eval --model sft_jax --model_args model=EXPORT_DIR` once this module is imported (lm-eval
0.4 finds models by a registry filled at import, not by entry points: `python -m
sft_jax.evaluate` imports it). Requests are tokenized as lm-eval's `hf` backend does them
(its TemplateLM: trailing spaces of the context move to the continuation, an empty context
scores after the prefix token), scored in length-bucketed batches (evaluation/scoring.py) and
generated greedily (or sampled) with the KV-cache sampler (generation/sampler.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from sft_jax.adapters.methods import AdapterMethod, for_peft_type
from sft_jax.adapters.prompts import prompt_prefix_ids
from sft_jax.core.errors import UsageError
from sft_jax.data.templates import load_tokenizer
from sft_jax.evaluation import generate as generation
from sft_jax.evaluation.scoring import score
from sft_jax.models import CausalLM, from_pretrained
from sft_jax.models.io.hf import resolve_model_dir
from sft_jax.models.partitioning import fsdp_mesh

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a config that names no context length
_LENGTH_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's order


def config_max_length(config: dict[str, Any], tokenizer: Any) -> int:
    """The context length lm-eval's `hf` backend reads from a config.json: its (text_config's
    first), else the tokenizer's model_max_length when set, else DEFAULT_MAX_LENGTH."""
    config = config.get("text_config") or config
    for field in _LENGTH_FIELDS:
        if config.get(field) is not None:
            return int(config[field])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < 10**12 else DEFAULT_MAX_LENGTH


def _adapter_method(model_dir: Path) -> AdapterMethod | None:
    """The family of the adapter the export leaves to load (a prompt adapter in adapter/; a
    LoRA export's adapter/ is merged into the weights already: adapters/methods.py), or None."""
    config_file = model_dir / "adapter" / "adapter_config.json"
    if not config_file.is_file():
        return None
    return for_peft_type(json.loads(config_file.read_text()).get("peft_type"))


def _load(directory: str, dtype: str) -> tuple[CausalLM, Any, Path]:
    """(model, tokenizer, directory) of an exported Hugging Face directory, with the prompt
    adapter of its adapter/ folder where it has one (as PEFT loads it on the base model)."""
    model_dir = resolve_model_dir(directory)
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"model_args dtype={dtype!r}: expected float32 or bfloat16.")
    tokenizer = load_tokenizer(model_dir)
    # Several processes: sharded over all of their devices (each process's alone can't hold
    # what the others compute with); one process: its default device.
    mesh = fsdp_mesh() if jax.process_count() > 1 else None
    model = from_pretrained(model_dir, mesh=mesh, param_dtype=jnp.dtype(dtype))
    method = _adapter_method(model_dir)
    if method is not None:
        log.info("%s: %s", method.load(model, model_dir / "adapter"), model_dir / "adapter")
    return model, tokenizer, model_dir


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise UsageError(f"model_args {name}={value!r}: expected a positive integer.")
    return number


@register_model("sft_jax")
class SftJaxLM(TemplateLM):
    """lm-eval's LM over a CausalLM: `model` is an export directory (or hub id) or a loaded
    CausalLM (then `tokenizer` is required). batch_size rows are scored or generated at once."""

    def __init__(
        self,
        model: str | CausalLM,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        seed: int = 0,
        device: str | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise UsageError(
                f"model_args {', '.join(sorted(unknown))}: not an argument of the sft_jax "
                "backend (model, batch_size, max_length, max_gen_toks, dtype, add_bos_token, "
                "prefix_token_id, seed)."
            )
        model_dir = None
        if isinstance(model, str):
            model, tokenizer, model_dir = _load(model, dtype)
        elif tokenizer is None:
            raise UsageError("SftJaxLM: a loaded CausalLM needs its tokenizer (tokenizer=...).")
        self.model, self.tokenizer = model, tokenizer
        # Prompt tuning, P-tuning: the virtual tokens every request starts with, after the
        # truncation to max_length, as PEFT prepends them (prefix tuning: the model's own).
        self.virtual_ids = prompt_prefix_ids(model)
        self.batch_size = _positive_int("batch_size", 8 if batch_size == "auto" else batch_size)
        self._max_length = (
            _positive_int("max_length", max_length)
            if max_length is not None
            else config_max_length(model.config.hf_config or {}, tokenizer)
        )
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = int(seed)
        self.decode_steps = 0  # new-token steps generate_until ran, all batches together
        self.stop_token_ids = generation.eos_token_ids(tokenizer, model.config.hf_config, model_dir)
        if device not in (None, "cpu"):
            log.warning("sft_jax lm-eval backend: device=%s ignored (JAX picks devices)", device)

    # --- Tokenization, as lm-eval's `hf` backend does it. ---

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context scores after: the given id, else BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of `string`; with add_special_tokens None the tokenizer's own choice (or
        add_bos_token's), except that a string that starts with the prefix token gets none."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered by the tokenizer's template; a final assistant message
        is continued when no generation prompt is asked for (lm-eval's prefill)."""
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # --- Requests. ---

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the
        argmax), with the sequence left-truncated to max_length + 1 tokens as `hf` does."""
        sequences, scored = [], []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("loglikelihood: empty context or continuation tokens.")
            sequences.append(self.virtual_ids + (context + continuation)[-(self.max_length + 1) :])
            scored.append(len(continuation))
        pad_id = self.tokenizer.pad_token_id or 0
        results = score(self.model, sequences, scored, batch_size=self.batch_size, pad_id=pad_id)
        return [(result.logprob, result.is_greedy) for result in results]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: disjoint windows of up to max_length tokens, each
        after the prefix token or the end of the window before (lm-eval's rolling windows)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for window in lm_utils.get_rolling_token_windows(
                token_list=tokens,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                context, continuation = lm_utils.make_disjoint_window(window)
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut before the first of its stop strings (`until`,
        and the EOS token's text), as `hf` does it; greedy unless do_sample."""
        return generation.generate_until(self, [request.args for request in requests])
