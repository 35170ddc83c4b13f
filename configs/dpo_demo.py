"""Offline DPO demo: preference-tune the SFT demo's export on synthetic right-vs-wrong pairs.

Run the SFT demo first (it writes /tmp/sft_demo/export), then:
  python main.py --config=configs/dpo_demo.py --workdir=/tmp/dpo_demo
The pairs (assets/demo_data/preference_*.jsonl, from scripts/make_preference_data.py) prompt with
a demo task, "chosen" is the right answer and "rejected" a wrong one (a nearby number, letters in
another order). LoRA adapters train; the reference is the same model with its adapters off.
Eval reports rewards/accuracies (pairs whose chosen reply gains more log-probability against
the reference than the rejected one) and the greedy exact match of the SFT demo.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "/tmp/sft_demo/export"
    config.train.objective = "dpo"
    config.preference.loss_type = "sigmoid"
    # A large beta saturates the DPO term once a pair is won (its gradient fades), so the
    # update stops pushing on the rejected replies, which share their first tokens with the
    # right ones ("52" vs "50"); beta 0.5 with learning rate 2e-3 cost 3 greedy answers of 200.
    config.preference.beta = 2.0
    # The NLL of the chosen replies (RPO) keeps the right answers likely, not just likelier
    # than the wrong ones: without it greedy exact match falls while the margins grow.
    config.preference.rpo_alpha = 2.0
    config.data.train_files = str(base.ASSETS / "demo_data" / "preference_train.jsonl")
    config.data.eval_files = str(base.ASSETS / "demo_data" / "preference_eval.jsonl")
    config.data.max_length = 256  # a row holds whole pairs: both replies and their prompts
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.dropout = 0.0
    config.train.steps = 200
    config.train.global_batch_size = 16
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 5
    config.eval.every_steps = 50
    config.eval.global_batch_size = 16
    config.checkpoint.every_steps = 50
    return config
