"""Chat with (or complete text from) a Hugging Face directory or a training run's checkpoint.

python -m sft_jax.chat --model=DIR [--prompt="..."] [--raw] [--max_new_tokens=256]
    [--temperature=0.7] [--top_p=0.9] [--seed=0] [--dtype=float32|bfloat16] [--image=PATH ...]
python -m sft_jax.chat --workdir=RUN_DIR [--step=N | --which=best|last] ...

With --prompt it prints one reply; without, it reads one user turn per line from stdin until EOF
and keeps the conversation. --raw continues the text as is instead of using the chat template.
The export of a prompt tuning, P-tuning or prefix tuning run is its base model with the PEFT
adapter in DIR/adapter: the reply is generated with the adapter's virtual tokens or prefixes.
--model may also name such an adapter directory (adapter_config.json) alone: its base is then
the adapter's base_model_name_or_path. --image (repeatable) puts images into the first user
message of an image-text model's conversation (cli/chat_images.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from absl import app, flags

from sft_jax import cli
from sft_jax.adapters import methods as adapter_methods
from sft_jax.adapters.methods import AdapterMethod
from sft_jax.cli import chat_images
from sft_jax.core.errors import UsageError
from sft_jax.data.templates import load_tokenizer
from sft_jax.generation.sampler import chat, chat_stop_token_ids, reply
from sft_jax.loop import export
from sft_jax.models import CausalLM, from_pretrained
from sft_jax.models.io.hf import resolve_model_dir

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)
flags.DEFINE_string("model", None, "A Hugging Face model directory (or hub id) with a tokenizer.")
flags.DEFINE_string("workdir", None, "Instead of --model: a training run's WORKDIR.")
flags.DEFINE_string("which", "best", "With --workdir: 'best', 'last', or a step number.")
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (overrides --which).")
flags.DEFINE_string("prompt", None, "One prompt to answer; without it, read turns from stdin.")
flags.DEFINE_bool("raw", False, "Plain text completion instead of the chat template.")
flags.DEFINE_integer("max_new_tokens", 256, "The most tokens generated per reply.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy decoding.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this mass.")
flags.DEFINE_integer("seed", 0, "Seed of the sampling keys.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_multi_string("image", [], "An image file for the first user message (repeatable).")


@contextlib.contextmanager
def model_directory(model: str | None, workdir: str | None, which: str | int) -> Iterator[str]:
    """--model as is, or the run's checkpoint exported to a temporary directory."""
    if bool(model) == bool(workdir):
        raise UsageError("pass exactly one of --model=DIR and --workdir=RUN_DIR.")
    if model:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="sft_jax_chat_") as out:
        yield str(export.export_run(workdir, which=which, out=out))


def load(name_or_path: str, dtype: Any) -> tuple[CausalLM, Any, list[int]]:
    """Model (with its prompt adapter, if any), tokenizer and chat stop tokens of a Hugging Face
    directory (or hub id), or of a prompt adapter's directory."""
    model_dir, adapter_dir, method = _base_and_adapter(resolve_model_dir(name_or_path))
    tokenizer = load_tokenizer(model_dir)  # first: a folder without one fails fast
    model = from_pretrained(model_dir, param_dtype=dtype)
    if method is not None:
        log.info("%s: %s", method.load(model, adapter_dir), adapter_dir)
    return model, tokenizer, chat_stop_token_ids(tokenizer, model_dir)


def _base_and_adapter(directory: Path) -> tuple[Path, Path | None, AdapterMethod | None]:
    """(the model directory, the adapter to put on it and the family that loads it, or None):
    an export's adapter/ holding an adapter that loads at inference (adapters/methods.py: a
    prompt method's; a LoRA export's model is merged already), or `directory` itself when it
    is such an adapter."""
    for adapter in (directory, directory / "adapter"):
        config_file = adapter / "adapter_config.json"
        if not config_file.is_file():
            continue
        config = json.loads(config_file.read_text())
        method = adapter_methods.for_peft_type(config.get("peft_type"))
        if method is None:
            continue
        if adapter == directory:
            base = config.get("base_model_name_or_path")
            if not base:
                raise UsageError(
                    f"{adapter}: the adapter names no base model (base_model_name_or_path); "
                    "pass --model=the export directory that holds it."
                )
            return resolve_model_dir(base), adapter, method
        return directory, adapter, method
    return directory, None, None


def respond(
    model: CausalLM,
    tokenizer: Any,
    history: list[dict[str, str]],
    text: str,
    raw: bool,
    options: dict[str, Any],
) -> str:
    """The reply to `text`; in chat mode both turns are appended to `history`. Without a chat
    template, or when raw, the text is continued as is (with the tokenizer's BOS)."""
    if raw or not tokenizer.chat_template:
        return reply(model, tokenizer, tokenizer(text)["input_ids"], **options)
    history.append({"role": "user", "content": text})
    answer = chat(model, tokenizer, history, **options)
    history.append({"role": "assistant", "content": answer})
    return answer


def main(argv: list[str]) -> None:
    del argv
    which = FLAGS.step if FLAGS.step is not None else FLAGS.which
    cli.run_command(lambda: converse(FLAGS.model, FLAGS.workdir, which))


def converse(model_name: str | None, workdir: str | None, which: str | int) -> None:
    """Answers --prompt, or each line of stdin in one conversation."""
    with model_directory(model_name, workdir, which) as model_dir:
        model, tokenizer, stops = load(model_dir, jnp.dtype(FLAGS.dtype))
        if FLAGS.image:
            processor = chat_images.image_processor(model, model_dir, FLAGS.raw)
            images = chat_images.open_images(FLAGS.image)
    options = {
        "stop_token_ids": stops,
        "max_new_tokens": FLAGS.max_new_tokens,
        "temperature": FLAGS.temperature,
        "top_p": FLAGS.top_p,
        "seed": FLAGS.seed,
    }
    history: list[dict[str, str]] = []

    def answer(text: str) -> str:
        if FLAGS.image:
            return chat_images.respond_with_images(model, processor, images, history, text, options)
        return respond(model, tokenizer, history, text, FLAGS.raw, options)

    if FLAGS.prompt is not None:
        print(answer(FLAGS.prompt))
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            print(answer(line.rstrip("\n")), flush=True)


if __name__ == "__main__":
    cli.define_debug_flag()
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, lambda argv: None))
