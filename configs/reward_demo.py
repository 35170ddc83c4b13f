"""Offline reward-model demo: a scalar head on the SFT demo's export, trained on the DPO demo's
synthetic right-vs-wrong pairs.

Run the SFT demo first (it writes /tmp/sft_demo/export), then:
  python main.py --config=configs/reward_demo.py --workdir=/tmp/reward_demo
The model is the SFT demo's with a new `score` head (transformers' LlamaForSequenceClassification,
num_labels=1), every weight trained; the loss is Bradley-Terry on (chosen, rejected) pairs, the
reward read at each sequence's last token that is not the pad token. Eval reports accuracy (held-out
pairs whose right answer scores higher), margin and mean_reward, TRL's RewardTrainer names; the
export at the end loads with transformers.AutoModelForSequenceClassification.from_pretrained.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "/tmp/sft_demo/export"
    config.train.objective = "reward"
    config.data.train_files = str(base.ASSETS / "demo_data" / "preference_train.jsonl")
    config.data.eval_files = str(base.ASSETS / "demo_data" / "preference_eval.jsonl")
    config.data.max_length = 256  # a row holds whole pairs: both replies and their prompts
    config.lora.rank = 0  # every weight trains (with a rank: LoRA, the new head in full)
    # ~48 pairs an update (rows pack whole pairs): 1500 updates are ~9 passes over the 8000 pairs.
    # Judging a sum or a reversal from one hidden state is slow to learn for a 2-layer model;
    # a higher peak rate learns it worse (5e-4: 74.5% after 300 updates, against 80.5% at 1e-4).
    config.train.steps = 1500
    config.train.global_batch_size = 12
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 10
    config.eval.every_steps = 300
    config.eval.global_batch_size = 16
    config.eval.generate_examples = 0  # a reward model scores; it does not generate
    config.eval.show_samples = 0
    config.checkpoint.every_steps = 500
    return config
