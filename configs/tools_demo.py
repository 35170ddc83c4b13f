"""Offline tool-use demo: the demo-size model learns to call a calculator tool and answer.

Data and model from scripts/make_tools_demo.py (assets/tools_demo_*). Eval conversations end at
the tool call, so eval/exact_match is the share of emitted tool-call JSON equal to the reference:
  python main.py --config=configs/tools_demo.py --workdir=/tmp/sft_tools_demo
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = str(base.ASSETS / "tools_demo_model")
    config.data.train_files = str(base.ASSETS / "tools_demo_data" / "train.jsonl")
    config.data.eval_files = str(base.ASSETS / "tools_demo_data" / "eval.jsonl")
    config.data.max_length = 256
    config.eval.max_new_tokens = 48
    # The calls are learnt within ~200 updates (exact match 0% -> 100% of 200 on CPU).
    config.train.steps = 300
    return config
