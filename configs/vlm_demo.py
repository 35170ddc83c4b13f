"""Offline image-text demo: a random tiny Gemma 3 learns to answer questions about pictures.

The model and the data are in assets/ (python scripts/make_vlm_demo_data.py --out=assets
remakes them, deterministically). Run:
  python main.py --config=configs/vlm_demo.py --workdir=/tmp/vlm_demo
The pictures (32 x 32 PNG bytes in assets/demo_data/vlm/{train,eval}.parquet: 8000 and 200) show
one coloured shape filling most of the picture, 1 to 3 large circles (one to a quarter) or a
rendered word; each question has a one-word answer ("What colour is the shape?" "red"). The
model sees a picture as 4 x 4 soft tokens, one per 8 x 8 pixel patch. Eval reports the loss and
eval/exact_match, the greedy replies generated with the pictures (all 200);
  python scripts/vlm_answer_match.py --metrics=/tmp/vlm_demo/metrics.jsonl
splits it by question when the run logged every sample (--config.eval.show_samples=200).
Measured on 2 CPU cores (with a test suite running beside it): 2000 updates in 4 min 54 s
wall, 4 min 14 s CPU (3 min 14 s user + 1 min 0 s sys); eval loss 3.60 -> 0.083, greedy exact
match 0% -> 93.5%: colour 100%, circle count 100%, word 92%, shape 82% (chance 25%, 33%, 25%,
33%; 43, 51, 62 and 44 pictures); 45.5% at update 250, 71.5% at 1000, 87% at 1500.
transformers' argmax on the export, teacher-forced (scripts/vlm_answer_match.py --model),
agrees: 93.5%, the same per question, reply loss 0.0830.
The figure varies between runs: --config.train.seed=1 (another shuffle) reached 85.5% (count
71%, shape 84%, word 89%, eval loss 0.190; 4 min 9 s CPU), and train.steps=3000 (cosine decay
over 3000) only 73.5% (shape 61%, count 47%, eval loss 0.255). With 4 x 4 pixel patches pooled
2 x 2 into the same 16 tokens, shape and count were 45% and 29% after 1500 updates (69%
overall); on the old data (2000 pictures, small shapes and circles) the model reached 68%
(shape 38%, count 44%).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = str(base.ASSETS / "vlm_demo_model")
    config.data.train_files = str(base.ASSETS / "demo_data" / "vlm" / "train.parquet")
    config.data.eval_files = str(base.ASSETS / "demo_data" / "vlm" / "eval.parquet")
    config.data.format = "messages"
    # The random vision tower trains too. Frozen (with the projector, as train_vision=False
    # freezes it), nothing about the picture is learned: a 64-wide variant after 300 updates had
    # eval loss 0.65 (the answer prior) frozen vs 0.42 trained, exact match 40% vs 65%.
    config.model.train_vision = True
    # A conversation is 45 tokens (16 of them the image's); 2 of them to a packed row.
    config.data.max_length = 96
    config.data.max_images_per_row = 2
    config.train.steps = 2000
    config.train.global_batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 20
    config.train.loss_chunk_size = 96
    config.eval.every_steps = 250
    config.eval.global_batch_size = 50
    config.eval.generate_examples = 200  # every eval picture: greedy reply, exact match
    config.eval.max_new_tokens = 4  # one answer word and <end_of_turn>
    config.checkpoint.every_steps = 250
    return config
