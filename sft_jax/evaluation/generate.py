"""lm-eval's generate_until on the KV-cache sampler: requests grouped by their generation
options, encoded and left-truncated as lm-eval's `hf` backend does, generated batch_size at a
time, each row ended as soon as its decoded text holds a stop string (generation/stepwise.py:
looked at every few steps), decoded and cut before the first stop string."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from sft_jax.core.errors import UsageError
from sft_jax.generation.stepwise import rollout_until

# Generation options of lm-eval task configs that the sampler implements (0 / 1: off).
_SAMPLING = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
_HANDLED = {"do_sample", "temperature", "until", "max_gen_toks"}


def eos_token_ids(
    tokenizer: Any, hf_config: dict[str, Any], model_dir: Path | None = None
) -> list[int]:
    """The tokens that end a generation as transformers' generate ends it for this model: the
    eos ids of model_dir/generation_config.json where it names them, else of the config; and
    the tokenizer's EOS (whose text lm-eval adds to every request's stop strings)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = (hf_config.get("text_config") or hf_config).get("eos_token_id")
    generation_config = model_dir / "generation_config.json" if model_dir else None
    if generation_config is not None and generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id", eos)
    ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(ids)


def sampling_options(gen_kwargs: dict[str, Any], default_max_gen_toks: int) -> dict[str, Any]:
    """(stop strings aside) the sampler's options for a request's generation kwargs; an
    option the sampler does not implement is refused by name."""
    kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks)
    unknown = sorted(set(kwargs) - _HANDLED - set(_SAMPLING))
    if unknown:
        raise UsageError(
            f"generation_kwargs {', '.join(unknown)}: not implemented by the sft_jax lm-eval "
            f"backend (it takes {', '.join(sorted(_HANDLED | set(_SAMPLING)))})."
        )
    options = {name: type(off)(kwargs.get(name, off)) for name, off in _SAMPLING.items()}
    greedy = not kwargs["do_sample"] or float(kwargs.get("temperature", 0.0)) <= 0.0
    options["temperature"] = 0.0 if greedy else float(kwargs["temperature"])
    options["max_new_tokens"] = int(kwargs["max_gen_toks"])
    return options


def context_ids(lm: Any, context: str, max_context: int) -> list[int]:
    """A context's tokens as `hf` encodes a generation batch: no special tokens where the
    text starts with BOS's text, else add_bos_token's choice or the tokenizer's; the last
    max_context of them."""
    tokenizer = lm.tokenizer
    add_special_tokens = lm.add_bos_token
    if tokenizer.bos_token and context.startswith(tokenizer.bos_token):
        add_special_tokens = False
    options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    ids = tokenizer.encode(context, **options)[-max_context:]
    if not ids:
        raise UsageError("generate_until: a request's context encodes to no tokens.")
    return ids


def _stop_strings_seen(lm: Any, until: list[str]) -> Callable[[int, list[int]], bool]:
    """Whether a row's new tokens, decoded as the reply is, hold one of the stop strings: the
    row can end there, its text cut before the string is the same."""
    until = [term for term in until if term]
    return lambda row, tokens: any(term in lm.tok_decode(tokens) for term in until)


def generate_until(lm: Any, requests: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The continuation of each (context, gen_kwargs), in request order."""
    groups: dict[str, list[int]] = {}
    for index, (_, gen_kwargs) in enumerate(requests):
        groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
    eos_text = lm.tok_decode([lm.eot_token_id], skip_special_tokens=False)
    texts: list[str | None] = [None] * len(requests)
    for indices in groups.values():
        gen_kwargs = copy.deepcopy(requests[indices[0]][1])  # the request's own stays as is
        until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=eos_text)
        options = sampling_options(gen_kwargs, lm.max_gen_toks)
        max_context = lm.max_length - options["max_new_tokens"]
        if max_context <= 0:
            raise UsageError(
                f"generate_until: max_gen_toks={options['max_new_tokens']} leaves no room for "
                f"a prompt within max_length={lm.max_length}; lower it or raise max_length."
            )
        prompts = {
            i: [*lm.virtual_ids, *context_ids(lm, requests[i][0], max_context)] for i in indices
        }
        order = sorted(indices, key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), lm.batch_size):
            batch = order[start : start + lm.batch_size]
            stepped = rollout_until(
                lm.model,
                [prompts[i] for i in batch],
                _stop_strings_seen(lm, until),
                stop_token_ids=lm.stop_token_ids,
                seed=lm.seed,
                pad_id=lm.tokenizer.pad_token_id or 0,
                **options,
            )
            lm.decode_steps += stepped.steps
            for index, tokens in zip(batch, stepped.rollout.tokens, strict=True):
                text = postprocess_generated_text(lm.tok_decode(tokens), until, None)
                texts[index] = text
                lm.cache_hook.add_partial("generate_until", requests[index], text)
    return texts
