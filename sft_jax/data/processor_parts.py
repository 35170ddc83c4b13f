"""A vision model's processor built from the parts in its folder, where AutoProcessor cannot
build it: transformers checks every sub-processor, and Qwen2.5-VL's video processor needs
torchvision (which images never use). The parts: the tokenizer, the image processor
(preprocessor_config.json; transformers falls back to its PIL class without torchvision), the
chat template (chat_template.jinja, chat_template.json or the tokenizer's), wrapped in the
processor class preprocessor_config.json or tokenizer_config.json names, with every other
sub-processor absent.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any


def processor_class_name(folder: Path, tokenizer: Any) -> str:
    """The processor class the folder names (preprocessor_config.json, else the tokenizer's)."""
    config = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    return config.get("processor_class") or tokenizer.init_kwargs.get("processor_class") or ""


def chat_template_of(folder: Path, tokenizer: Any) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        saved = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))
        return saved.get("chat_template")
    return tokenizer.chat_template


def _without_absent_parts(cls: type) -> type:
    """cls, accepting None for a sub-processor it would check (images use none of them)."""
    check = cls.check_argument_for_proper_class

    def lenient(self, name: str, argument: Any) -> Any:
        return None if argument is None else check(self, name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": lenient})


def processor_from_parts(source: str | Path) -> Any:
    """The processor of a local model folder, built from its parts (see the module docstring);
    raises what transformers raises where a part is missing."""
    import transformers

    folder = Path(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    image_processor = transformers.AutoImageProcessor.from_pretrained(
        folder, trust_remote_code=False
    )
    name = processor_class_name(folder, tokenizer)
    cls = getattr(transformers, name, None) if name.endswith("Processor") else None
    if cls is None:
        raise ValueError(f"no transformers processor class {name!r} (processor_class)")
    kwargs = {"image_processor": image_processor, "tokenizer": tokenizer}
    kwargs["chat_template"] = chat_template_of(folder, tokenizer)
    parameters = inspect.signature(cls.__init__).parameters
    kwargs.update({p: None for p in parameters if p.endswith("_processor") and p not in kwargs})
    return _without_absent_parts(cls)(**kwargs)


# What a processor reads beside the tokenizer's files and the weights: the image (and video)
# processor's settings, the processor's own, and the chat template in its two spellings.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_processor_files(source: str | Path, out: str | Path) -> list[str]:
    """Copies an image-text model folder's processor files (those it has) into `out`, an
    export holding the weights and the run's tokenizer: transformers' processor (or its parts)
    then loads from `out` alone. A file the export already holds is kept (the chat template the
    run's tokenizer wrote is the one it trained with). A text model's folder (neither
    preprocessor_config.json nor processor_config.json, where transformers 5 writes the image
    processor's settings too) gives nothing. Returns the names copied."""
    source, out = Path(source), Path(out)
    if not any((source / name).is_file() for name in PROCESSOR_FILES[:2]):
        return []
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file() and not (out / name).exists():
            (out / name).write_bytes((source / name).read_bytes())
            copied.append(name)
    return copied
