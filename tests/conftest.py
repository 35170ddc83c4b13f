"""Test-wide settings: 8 fake CPU devices, strict rank promotion, fp32 matmuls; every folder
of test modules importable (folders_on_path.py); no ConfigDict read below the entry points
(config_guard.py)."""

import os

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

import config_guard
import jax
import pytest

config_guard.install()

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
