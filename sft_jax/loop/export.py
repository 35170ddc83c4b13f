"""Export a run's checkpoint as a Hugging Face directory.

python -m sft_jax.export --workdir=DIR [--step=N | --which=best|last] [--out=DIR]

--workdir and --out may be bucket URLs (s3://, gs://): read and written through a local
staging copy (sft_jax.workdir.bucket_mirror).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from sft_jax.adapters import methods as adapter_methods
from sft_jax.adapters.methods import AdapterMethod
from sft_jax.core.spec import RunSpec
from sft_jax.data import run_tokenizer
from sft_jax.data.cloud import is_remote
from sft_jax.models import DTYPES, CheckpointError, from_hf_config, save_pretrained
from sft_jax.models.io.hf import abstract_model, load_hf_config, resolve_model_dir
from sft_jax.train import sharding
from sft_jax.train.setup import build_model, score_labels
from sft_jax.workdir import bucket_mirror, rundir
from sft_jax.workdir.bucket_mirror import BucketMirror
from sft_jax.workdir.checkpointing import Checkpoints

log = logging.getLogger(__name__)


def export_run(
    workdir: str | Path,
    *,
    which: str | int = "best",
    out: str | Path | None = None,
    staging_root: str = "",
    mirror: BucketMirror | None = None,
) -> str | Path:
    """Writes the chosen checkpoint's parameters with config, tokenizer and generation config.

    A bucket `workdir` is read from its staging copy; an export bound for a bucket (`out` a
    URL, or the default WORKDIR/export of a bucket run, `mirror` that run's when `workdir` is
    already its staging copy) is written locally, complete, then uploaded. Returns where it is.
    """
    local = bucket_mirror.readable_run(workdir, staging_root)
    if mirror is None and is_remote(str(workdir)):
        mirror = BucketMirror(str(workdir), staging_root)
    staged, url = _export_target(local, out, staging_root, mirror)
    _export(local, which, staged)
    if url is None:
        return staged
    if jax.process_index() == 0:
        bucket_mirror.upload_tree(staged, url)
    return url


def _export_target(
    local: Path, out: str | Path | None, staging_root: str, mirror: BucketMirror | None
) -> tuple[Path, str | None]:
    """(the local folder the export is written to, the URL it is uploaded to or None)."""
    if out is not None and is_remote(str(out)):
        return bucket_mirror.staging_dir(str(out), staging_root), str(out).rstrip("/")
    staged = rundir.export_dir(local, out)
    if out is None and mirror is not None:
        return staged, mirror.remote(staged)
    return staged, None


def _export(workdir: Path, which: str | int, out: Path) -> Path:
    """The export of a local WORKDIR's checkpoint to the local folder `out`."""
    checkpoints = rundir.open_run(workdir)
    step = rundir.pick_step(checkpoints, which)
    config = RunSpec.from_saved(checkpoints.meta(step)["config"], f"{checkpoints.directory}/{step}")
    adapted = adapter_methods.enabled_methods(config)
    if adapted:
        return _export_adapted(checkpoints, step, config, out, adapted[0])
    model_dir = resolve_model_dir(config.model.name_or_path)
    param_dtype = DTYPES[config.model.param_dtype]
    model_config = from_hf_config(load_hf_config(model_dir))
    if score_labels(config) is not None:
        model_config = dataclasses.replace(model_config, score_labels=score_labels(config))
    if model_config.vision is not None and not config.model.train_vision:
        # The checkpoint holds what trained; the frozen vision tower is the base model's.
        exported = _trained_model(checkpoints, step, config)
    else:
        model = abstract_model(model_config, dtype=param_dtype, param_dtype=param_dtype)
        abstract = sharding.abstract_params(model, sharding.make_mesh(fsdp=-1))
        exported = nnx.merge(nnx.graphdef(model), _restore(checkpoints, step, abstract))
    with _replacing(out) as partial:
        save_pretrained(
            exported, partial, tokenizer=run_tokenizer(config), generation_config_from=model_dir
        )
        _copy_processor(model_dir, partial)
    log.info("exported step %d of %s to %s", step, checkpoints.directory, out)
    return out


# An image-text model's processor beside its tokenizer: AutoProcessor loads the export.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _copy_processor(model_dir: Path, out: Path) -> None:
    for name in PROCESSOR_FILES:
        if (Path(model_dir) / name).is_file() and jax.process_index() == 0:
            shutil.copyfile(Path(model_dir) / name, out / name)


def _restore(checkpoints: Checkpoints, step: int, abstract: Any) -> Any:
    """The parameters of a step; a step whose files cannot be read is named, with the others."""
    try:
        return checkpoints.restore_params(step, abstract)
    except Exception as e:
        others = [s for s in checkpoints.steps() if s != step]
        raise CheckpointError(
            f"{checkpoints.directory}/{step}: the checkpoint of step {step} cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Export another step with "
            f"--step=N (saved: {others or 'none'})."
        ) from e


@contextlib.contextmanager
def _replacing(out: Path) -> Iterator[Path]:
    """A folder beside `out` to write into, which replaces `out` once complete: an export
    stopped half way never leaves a half-written `out`."""
    partial = out.with_name(out.name + ".partial")
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    yield partial
    if jax.process_index() == 0:
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)


def trained_run_model(workdir: str | Path, which: str | int = "best") -> tuple[Any, Any]:
    """(the run's model as it trained: its adapters unmerged, holding the chosen checkpoint's
    trained parameters, sharded over the local devices; its tokenizer): what an evaluation of
    the run reads without an export. A bucket WORKDIR is read from its staging copy."""
    checkpoints = rundir.open_run(bucket_mirror.readable_run(workdir, ""))
    step = rundir.pick_step(checkpoints, which)
    config = RunSpec.from_saved(checkpoints.meta(step)["config"], f"{checkpoints.directory}/{step}")
    log.info("evaluating step %d of %s as it trained", step, checkpoints.directory)
    return _trained_model(checkpoints, step, config), run_tokenizer(config)


def _trained_model(checkpoints: Checkpoints, step: int, config) -> Any:
    """The run's model, with its adapters, holding the checkpoint's trained parameters (laid
    out on the mesh as training lays them out: a prompt adapter's replicated over it)."""
    mesh = sharding.make_mesh(fsdp=-1)
    model, _, trainable = build_model(config, mesh)
    state = nnx.state(model, trainable)
    abstract = sharding.abstract_params(model, mesh, trainable)
    nnx.replace_by_pure_dict(state, _restore(checkpoints, step, abstract))
    nnx.update(model, state)
    return model


def _export_adapted(
    checkpoints: Checkpoints, step: int, config, out: Path, method: AdapterMethod
) -> Path:
    """The run's adapters as `method` exports them (adapters/methods.py): its PEFT adapter in
    out/adapter, and in out the model merged with them, or the base model to load them on."""
    model = _trained_model(checkpoints, step, config)
    with _replacing(out) as partial:
        model, written = method.export(model, config, partial)
        save_pretrained(
            model,
            partial,
            tokenizer=run_tokenizer(config),
            generation_config_from=resolve_model_dir(config.model.name_or_path),
        )
        _copy_processor(resolve_model_dir(config.model.name_or_path), partial)
    log.info("exported step %d of %s to %s: %s", step, checkpoints.directory, out, written)
    return out
