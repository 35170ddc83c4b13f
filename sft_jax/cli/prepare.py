"""Tokenize every source of a config into its store once, before training (or on any host).

  python -m sft_jax.data.prepare --config=configs/base.py --config.data.loader=stream

Writes (or finds) the memory-mapped stores (sft_jax.data.store) of config.data's train and
eval files, or of every source of config.data.mixture, tokenizing in parallel
(config.data.num_workers), and prints one line per store; data with images is prepared by the
model's processor, its image arrays stored beside the tokens (sft_jax.data.vision_stream).
Training reuses them; it runs the same step itself when a store is missing. The data and
config modules load inside main(): a spawned tokenizer worker imports this module again and
must stay light.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sft_jax import cli
from sft_jax.cli.overrides import unknown_override
from sft_jax.core.spec import RunSpec


def main(argv: list[str]) -> None:
    del argv
    from sft_jax.data import pipeline, vision_source, vision_stream
    from sft_jax.data.mixture import prepare_all
    from sft_jax.train.config_check import check_values

    def prepare() -> None:
        config = RunSpec.of(flags.FLAGS.config)
        check_values(config, device_count=1, batch_shards=1)  # the data fields matter here
        if vision_source.has_images(config):  # the model's processor prepares image data
            for name, prepared in vision_stream.prepare_stores(config):
                print(f"{name}: {pipeline.summary_line(prepared.tokenized.stats)}")
            return
        ready = prepare_all(config)
        for source, tokenized in zip(ready.sources, ready.train, strict=True):
            print(f"{source.name}: {pipeline.summary_line(tokenized.stats)}")
        for name, tokenized in ready.evals.items():
            print(f"{name} eval: {len(tokenized)} documents")

    cli.run_command(prepare)


if __name__ == "__main__":
    # Flags are defined only when run as a command, so importing this module defines none.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    flags.mark_flag_as_required("config")
    cli.define_debug_flag()
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, unknown_override))
