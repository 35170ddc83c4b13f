"""Offline online-RL demo: GRPO on sums the SFT demo model was never trained on.

Run the SFT demo first (it writes /tmp/sft_demo/export), then:
  python main.py --config=configs/grpo_demo.py --workdir=/tmp/grpo_demo
The prompts (assets/demo_data/grpo_*.jsonl, from scripts/make_grpo_data.py) add 0 to a number
or put the one-digit number first ("Add 7 and 45."): the SFT model learned neither and gets them
partly right. Every update samples 8 replies to each of 4 prompts from the live weights, scores
them by value (the "math" reward: math-verify), and raises the likelihood of the replies that
beat their group. Eval reports the held-out prompts' mean reward, greedy pass@1 and pass@8.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "/tmp/sft_demo/export"
    config.train.objective = "grpo"
    config.data.train_files = str(base.ASSETS / "demo_data" / "grpo_train.jsonl")
    config.data.eval_files = str(base.ASSETS / "demo_data" / "grpo_eval.jsonl")
    config.grpo.num_generations = 8
    config.grpo.max_prompt_length = 32
    config.grpo.max_completion_length = 8  # the answers are 2 or 3 digits and the end of turn
    config.grpo.reward_funcs = "math"
    config.grpo.eval_samples = 8
    config.train.global_batch_size = 32  # 4 prompts x 8 completions per update
    config.train.steps = 300
    # 1e-4 learns the zero sums in 75 updates, then wanders; 3e-4 collapses to empty replies.
    config.train.learning_rate = 5e-5
    config.train.warmup_steps = 5
    config.train.lr_schedule = "constant"
    config.eval.every_steps = 50
    config.eval.global_batch_size = 64
    config.checkpoint.every_steps = 50
    return config
