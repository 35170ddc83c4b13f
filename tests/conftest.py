"""Test-wide settings: 8 fake CPU devices, strict rank promotion, fp32 matmuls; every folder
of test modules importable (folders_on_path.py); no ConfigDict read below the entry points
(config_guard.py)."""

import atexit
import os
import shutil
import tempfile

import folders_on_path  # noqa: F401 (every folder of test modules on sys.path)

# Must be set before jax initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The metrics writer refuses keys missing from the metrics reference (workdir/metric_names.py),
# in this process and in every run it starts.
os.environ.setdefault("SFT_JAX_STRICT_METRICS", "1")
# One XLA compile per distinct program: JAX's persistent compilation cache, in a folder of this
# test process (an xdist worker writes only its own) that the runs it starts inherit. A test
# that builds the step an earlier test or run built loads the executable instead of compiling.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sft_jax_xla_cache_")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import config_guard
import jax
import pytest

config_guard.install()
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (directory, transformers model): that family's tiny random model
    (tests/hf_models.py, seed 0), saved once per test process. Never write into the
    directory: copy it to change it."""
    from hf_models import save_hf_model

    saved = {}

    def get(family: str):
        if family not in saved:
            path = tmp_path_factory.mktemp(family.replace(".", "_"))
            saved[family] = (path, save_hf_model(family, path))
        return saved[family]

    return get
