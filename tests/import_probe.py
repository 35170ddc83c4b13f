"""A tokenizer that writes down which heavy packages its process holds each time it tokenizes:
handed to the tokenizer worker processes, it shows what a worker imported to do its share.

Imports nothing beyond the standard library, so that importing it (as a worker process does to
unpickle it) adds nothing to what it reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "torch")


class ImportProbe:
    """Delegates to `tokenizer`; each call writes `<pid>.json` in `out_dir`: the heavy modules
    loaded in this process (names whose first part is in HEAVY)."""

    def __init__(self, tokenizer: Any, out_dir: str) -> None:
        self.tokenizer = tokenizer
        self.out_dir = out_dir

    def __getattr__(self, name: str) -> Any:
        if name in ("tokenizer", "out_dir") or name.startswith("__"):
            raise AttributeError(name)  # unpickling looks these up before the state is set
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
        Path(self.out_dir, f"{os.getpid()}.json").write_text(json.dumps(heavy))
        return self.tokenizer(*args, **kwargs)
