"""Export a run's checkpoint as a Hugging Face directory.

python -m sft_jax.export --workdir=DIR [--step=N | --which=best|last] [--out=DIR]
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import transformers
from absl import app, flags
from flax import nnx

from sft_jax import sharding
from sft_jax.checkpointing import Checkpoints, checkpoint_dir
from sft_jax.errors import ConfigError, UserError
from sft_jax.models import from_hf_config, save_pretrained
from sft_jax.models.hf_io import abstract_model, load_hf_config, resolve_model_dir
from sft_jax.step import param_shardings

log = logging.getLogger(__name__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def open_run(workdir: str | Path, field: str = "--workdir") -> Checkpoints:
    """Another (finished or stopped) run's checkpoints, read only; a clear error when none."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise ConfigError(
            f"{field}={workdir}: {directory} does not exist; give the WORKDIR of a run that saved "
            "checkpoints."
        )
    checkpoints = Checkpoints(directory, read_only=True)
    if not checkpoints.steps():
        raise ConfigError(f"{field}={workdir}: {directory} holds no complete checkpoint.")
    return checkpoints


def pick_step(checkpoints: Checkpoints, which: str | int) -> int:
    """The step `which` names among a run's checkpoints (opened by open_run: there is one)."""
    steps = checkpoints.steps()
    if isinstance(which, int) or str(which).isdigit():
        if int(which) not in steps:
            raise ConfigError(
                f"{checkpoints.directory}: no checkpoint at step {which}; have {steps}."
            )
        return int(which)
    if which == "best":
        best = checkpoints.best_step()
        return steps[-1] if best is None else best
    if which == "last":
        return steps[-1]
    raise ConfigError(f"which={which!r}: expected 'best', 'last' or a step number.")


def load_tokenizer(config: ml_collections.ConfigDict, model_dir: Path):
    """The run's tokenizer, carrying the chat template it was trained with."""
    source = config.data.get("tokenizer", "") or model_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    template = config.data.get("chat_template", "")
    if template:
        from sft_jax.data.templates import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(template)
    return tokenizer


def export_run(
    workdir: str | Path, *, which: str | int = "best", out: str | Path | None = None
) -> Path:
    """Writes the chosen checkpoint's parameters with config, tokenizer and generation config."""
    checkpoints = open_run(workdir)
    step = pick_step(checkpoints, which)
    config = ml_collections.ConfigDict(json.loads(checkpoints.meta(step)["config"]))
    out = Path(out) if out else Path(workdir) / "export"
    if config.lora.rank:
        return _export_lora(checkpoints, step, config, out)
    model_dir = resolve_model_dir(config.model.name_or_path)
    model_config = from_hf_config(load_hf_config(model_dir))
    param_dtype = _DTYPES[config.model.param_dtype]
    model = abstract_model(model_config, dtype=param_dtype, param_dtype=param_dtype)
    mesh = sharding.make_mesh(fsdp=-1)
    abstract_params = abstract_like_shardings(model, mesh)
    params = checkpoints.restore_params(step, abstract_params)
    exported = nnx.merge(nnx.graphdef(model), params)
    save_pretrained(
        exported, out, tokenizer=load_tokenizer(config, model_dir), generation_config_from=model_dir
    )
    log.info("exported step %d of %s to %s", step, checkpoints.directory, out)
    return out


def _export_lora(checkpoints: Checkpoints, step: int, config, out: Path) -> Path:
    """Base model + the checkpoint's adapters: PEFT adapter in out/adapter, merged model in out."""
    from sft_jax.lora import save_adapter
    from sft_jax.model_setup import build_model

    config = ml_collections.ConfigDict(config.to_dict())
    config.model.attention = "xla"  # no training here: the kernel it trained with may be absent
    model, spec, trainable = build_model(config, sharding.make_mesh(fsdp=-1))
    state = nnx.state(model, trainable)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, checkpoints.restore_params(step, abstract))
    nnx.update(model, state)
    model_dir = resolve_model_dir(config.model.name_or_path)
    save_adapter(model, out / "adapter", spec, base_model=config.model.name_or_path)
    save_pretrained(
        model, out, tokenizer=load_tokenizer(config, model_dir), generation_config_from=model_dir
    )
    log.info("exported step %d of %s: adapter in %s/adapter, merged model in %s", step,
             checkpoints.directory, out, out)  # fmt: skip
    return out


def abstract_like_shardings(model, mesh) -> dict:
    """Abstract params (shape, dtype, sharding on `mesh`) of an abstract model."""
    shardings = param_shardings(model, mesh)
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    FLAGS = flags.FLAGS  # noqa: N806 (absl's name)
    which = FLAGS.step if FLAGS.step is not None else FLAGS.which
    try:
        print(export_run(FLAGS.workdir, which=which, out=FLAGS.out))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    # Flags are defined only when run as a command: importing this module defines none.
    flags.DEFINE_string("workdir", None, "The run's WORKDIR (or its checkpoints/ folder).")
    flags.DEFINE_string("which", "best", "'best', 'last', or a step number.")
    flags.DEFINE_integer("step", None, "Step to export (overrides --which).")
    flags.DEFINE_string("out", None, "Output directory (default WORKDIR/export).")
    flags.mark_flag_as_required("workdir")
    app.run(main)
