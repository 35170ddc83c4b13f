"""Look at what training will see: rendered examples with trained spans marked, and totals.

  python -m sft_jax.data.inspect --config=configs/base.py [--num_examples=3] [--json]
  python -m sft_jax.data.inspect --config=configs/base.py --check [--sample=N] [--json]

Trained tokens are shown inside [[ ]]. Totals: examples read, kept, dropped by reason,
truncated, tokens, trainable tokens, and the packing efficiency (share of row slots holding a
token rather than padding) of one epoch.

--check prints the mask certificate (sft_jax.data.certificate) of the training data (all, or
the first N examples): trained and untrained tokens per role and field, and every violation
with its file, line and span; it exits with status 1 when there is any. The pipeline and
config checks load where they are used: a spawned tokenizer worker imports this module again
and must stay light (no JAX).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sft_jax import cli
from sft_jax.cli.overrides import unknown_override
from sft_jax.core.errors import UsageError
from sft_jax.core.spec import RunSpec
from sft_jax.data import batches, certificate
from sft_jax.data.tokenize import Tokenized


def marked_text(tokenizer: Any, tokens: np.ndarray, trained: np.ndarray) -> str:
    """The document's text, each run of trained tokens inside [[ ]]."""
    out, previous = [], False
    for token, flag in zip(tokens.tolist(), trained.tolist(), strict=True):
        if flag != previous:
            out.append("[[" if flag else "]]")
        out.append(tokenizer.decode([token]))
        previous = flag
    return "".join(out) + ("]]" if previous else "")


def totals(
    tokenized: Tokenized, row_len: int, packing: bool, seed: int, rows: int | None = None
) -> dict[str, Any]:
    """The stats of the documents with their rows of one epoch (`rows`: that count where the
    caller packs them otherwise, as data with images is packed under its image budget)."""
    if rows is None:
        rows = len(batches.epoch_rows(tokenized, row_len, packing, seed, epoch=0, shuffle=False))
    filled = int(tokenized.lengths().sum())
    return {
        **tokenized.stats,
        "rows_per_epoch": rows,
        "packing_efficiency": filled / max(rows * row_len, 1),
    }


def report(config: RunSpec, num_examples: int, as_json: bool) -> dict:
    """Prints examples and totals of the train (and eval) data; returns the totals."""
    from sft_jax.data.pipeline import load_datasets
    from sft_jax.data.vision_source import has_images, load_vision_datasets

    # Data with images: the documents the model's processor prepares, image tokens and all,
    # packed under the image budget too (rows: their count per epoch).
    loaded, rows = (
        load_vision_datasets(config) if has_images(config) else (load_datasets(config), {})
    )
    data, seed = config.data, config.train.seed
    result = {
        name: None
        if documents is None
        else totals(documents, data.max_length, data.packing, seed, rows.get(name))
        for name, documents in (("train", loaded.train), ("eval", loaded.eval))
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    for index in range(min(num_examples, len(loaded.train))):
        tokens, trained = loaded.train.document(index)
        print(f"--- train document {index} ({len(tokens)} tokens, {int(trained.sum())} trained)")
        print(marked_text(loaded.tokenizer, tokens, trained))
    for name, stats in result.items():
        if stats is None:
            continue
        print(
            f"{name}: {stats['examples_read']} examples read, {stats['examples_kept']} kept, "
            f"dropped {stats['dropped'] or 'none'}, {stats['truncated']} truncated; "
            f"{stats['tokens']} tokens, {stats['trainable_tokens']} trainable tokens; "
            f"{stats['rows_per_epoch']} rows of {data.max_length} per epoch, packing "
            f"efficiency {stats['packing_efficiency']:.1%}"
            + (
                f"; {stats['expanded_examples']} conversations rendered as "
                f"{stats['expanded_documents']} documents (history rewritten by the template)"
                if stats.get("expanded_examples")
                else ""
            )
        )
    return result


def check(config: RunSpec, sample: int, as_json: bool) -> dict:
    """Prints the mask certificate of the training data; returns it."""
    from sft_jax.data.pipeline import certify, run_tokenizer

    if config.data.train_on == "all_tokens":  # the certificate checks turns' spans
        raise UsageError(
            "--check with config.data.train_on='all_tokens': every token trains (image tokens "
            "excepted), so there is no per-turn mask to certify; run it with 'all_assistant' or "
            "'last_assistant', or inspect without --check to see the trained tokens."
        )
    result = certify(config, run_tokenizer(config), sample)
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    print(certificate.table(result))
    for violation in result["violations"]:
        print(f"{violation['where']}: characters {violation['span']}: {violation['problem']}")
    return result


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS  # noqa: N806 (absl's name)

    def inspect() -> None:
        from sft_jax.train.config_check import check_values

        spec = RunSpec.of(FLAGS.config)
        check_values(spec, device_count=1, batch_shards=1)  # the data fields matter here
        if FLAGS.check:
            sys.exit(1 if check(spec, FLAGS.sample, FLAGS.json)["violations"] else 0)
        report(spec, FLAGS.num_examples, FLAGS.json)

    cli.run_command(inspect)


if __name__ == "__main__":
    # Flags are defined only when run as a command, so importing this module defines none.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    flags.DEFINE_integer("num_examples", 3, "Rendered training examples to print.")
    flags.DEFINE_bool("json", False, "Print only the totals (or the certificate) as JSON.")
    flags.DEFINE_bool("check", False, "Verify what trains per role and field (exit 1 if not).")
    flags.DEFINE_integer("sample", 0, "With --check: the first N training examples (0: all).")
    flags.mark_flag_as_required("config")
    cli.define_debug_flag()
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, unknown_override))
