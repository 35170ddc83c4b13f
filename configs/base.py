"""Offline default: fine-tune the tiny demo model shipped in this repository.

Run:
  python main.py --config=configs/base.py --workdir=/tmp/sft_demo
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- model
    config.model = ml_collections.ConfigDict()
    # Local Hugging Face directory (config.json + *.safetensors) or a hub id.
    config.model.name_or_path = "assets/demo_model"
    # dtype the parameters are stored in: "float32" or "bfloat16".
    config.model.param_dtype = "float32"

    # ---------------------------------------------------------------- data
    # (data block: owned by the data pipeline; fields documented one by one)
    config.data = ml_collections.ConfigDict()
    # ---------------------------------------------------------------- end data

    return config.lock()
