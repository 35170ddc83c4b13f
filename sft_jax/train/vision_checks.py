"""What a run with images does not combine with yet, refused before anything loads: objectives
other than SFT (their pairs and prompts are tokenized as text, without the model's processor),
prompt methods (their virtual tokens are not laid out with the image tokens) and a sequence
split over mesh.context (it reorders tokens, which image placement does not follow). A text
dataset on an image-text model needs none of this: it trains as any text model does."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

from sft_jax.core.errors import ConfigError, UserError
from sft_jax.data import images, records
from sft_jax.data.cloud import is_remote
from sft_jax.objectives import registry

# The fields of a record that hold messages: SFT's, preference pairs' (TRL) and prompts'.
MESSAGE_FIELDS = ("messages", "prompt", "chosen", "rejected", "completion")

# Why an objective's data cannot hold images, by what it reads (objectives/registry.py).
WHY_NOT = {
    "pairs": "its chosen/rejected pairs are tokenized as text, without the model's processor",
    "prompts": "its rollouts are sampled from text prompts, without their images",
}


def check_image_run(config: Any) -> None:
    """Refuses a run with images in config.data's files that combines them with what does not
    take images yet; reads only the first records of each local file, and only where the run
    asks for one of those things."""
    kind = registry.kind_of(config)
    method = config.prompt.method
    if kind.reads == "examples" and not method and config.mesh.context == 1:
        return
    where = _first_with_images(config)
    if where is None:
        return
    if kind.reads != "examples":
        raise ConfigError(
            f"config.train.objective={registry.name_of(config)!r} with images ({where}): "
            f"{WHY_NOT[kind.reads]}. Only train.objective='sft' trains on images so far; use "
            "it, or data without images."
        )
    if method:
        raise ConfigError(
            f"config.prompt.method={method!r} with images ({where}): virtual tokens are not laid "
            "out with the image tokens yet (Qwen2.5-VL's M-RoPE positions, Gemma 3's image "
            "blocks). Use LoRA (config.lora.rank) instead, or data without images."
        )
    raise ConfigError(
        f"config.mesh.context={config.mesh.context} with images ({where}): the sequence split "
        "over the context axis reorders the tokens, which the placement of image features does "
        "not follow yet. Use mesh.context=1 and split the model over mesh.fsdp / mesh.tensor."
    )


def holds_images(value: Any) -> bool:
    """Does a raw record hold an image: an `images` column, or an image part in any of its
    messages (SFT's `messages`, a pair's prompt/chosen/rejected, a prompt)?"""
    if not isinstance(value, dict):
        return False
    return images.has_images(value) or any(
        images.has_images({"messages": value[field]})
        for field in MESSAGE_FIELDS
        if isinstance(value.get(field), list)
    )


def _first_with_images(config: Any) -> str | None:
    """'config.data.<field>: <file>' of the first train or eval file whose first records
    (images.SCAN_RECORDS) hold an image, a mixture's sources included; None if none does. Hub
    datasets and remote files are not read here (their loaders refuse image records
    themselves); an unreadable file is left to the data loader, which names the problem."""
    for field, files, split in _data_files(config.data):
        try:
            sources = records.expand_sources(files, field)
        except UserError:
            continue
        for source in sources:
            if source.startswith(records.HUB_PREFIX) or is_remote(source):
                continue
            if not Path(source).is_file():
                continue
            try:
                stream = records.read_records(source, split, _Ignore())
                found = any(holds_images(r.value) for r in islice(stream, images.SCAN_RECORDS))
            except UserError:
                continue
            if found:
                return f"{field}: {source}"
    return None


def _data_files(data: Any) -> list[tuple[str, str, str]]:
    """(config field, files, split) of every train and eval file spec of config.data."""
    entries = [
        ("config.data.train_files", data.train_files, data.train_split),
        ("config.data.eval_files", data.eval_files, data.eval_split),
    ]
    for index, entry in enumerate(data.mixture or ()):
        name = f"config.data.mixture[{entry.get('name', index)}]"
        for kind in ("train", "eval"):
            split = entry.get(f"{kind}_split", getattr(data, f"{kind}_split"))
            entries.append((f"{name}.{kind}_files", entry.get(f"{kind}_files", ""), split))
    return [entry for entry in entries if entry[1]]


class _Ignore:
    """Bad lines are the data loader's to report."""

    def bad(self, where: str, problem: str, reason: str = "") -> None:
        del where, problem, reason
