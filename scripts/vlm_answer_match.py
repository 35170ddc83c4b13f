"""Teacher-forced exact match of an image-text model on a vision jsonl, by transformers.

  python scripts/vlm_answer_match.py --model=/tmp/vlm_demo/export \
      --processor=assets/vlm_demo_model --data=assets/demo_data/vlm/eval.jsonl

An example counts when the argmax at every position of its last reply's tokens and of its
<end_of_turn> is that token: by induction exactly the examples greedy generation answers
right. Prints the share over all examples and per question, and the mean loss of those tokens.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "assets/vlm_demo_model", "Hugging Face folder of the model.")
flags.DEFINE_string("processor", "", "Folder of its processor ('' = --model).")
flags.DEFINE_string("data", "assets/demo_data/vlm/eval.jsonl", "Vision-format jsonl.")


def _messages(example: dict, folder: Path) -> list[dict]:
    """The messages without the last reply, each image part holding its PIL image."""
    images = iter(PIL.Image.open(folder / name).convert("RGB") for name in example["images"])
    messages = []
    for message in example["messages"][:-1]:
        content = message["content"]
        if isinstance(content, list):
            content = [{**p, "image": next(images)} if p["type"] == "image" else p for p in content]
        messages.append({**message, "content": content})
    return messages


def _reply_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def score(model, processor, example: dict, folder: Path) -> tuple[bool, float, int]:
    """(every reply token and <end_of_turn> the argmax, their summed NLL, their count)."""
    inputs = processor.apply_chat_template(
        _messages(example, folder),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    tokenizer = processor.tokenizer
    reply = tokenizer(_reply_text(example["messages"][-1]), add_special_tokens=False).input_ids
    reply = [*reply, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    prompt = inputs["input_ids"].shape[1]
    reply_ids = torch.tensor([reply])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], reply_ids], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], 0 * reply_ids], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, prompt - 1 : -1].double()
    log_probs = torch.log_softmax(logits, -1).numpy()
    positions = np.arange(len(reply))
    right = bool((log_probs.argmax(-1) == np.array(reply)).all())
    return right, float(-log_probs[positions, reply].sum()), len(reply)


def main(argv: list[str]) -> None:
    del argv
    processor = transformers.AutoProcessor.from_pretrained(FLAGS.processor or FLAGS.model)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(FLAGS.model).eval()
    data = Path(FLAGS.data)
    by_question, nll, count = collections.defaultdict(list), 0.0, 0
    for line in data.read_text(encoding="utf-8").splitlines():
        example = json.loads(line)
        right, loss, tokens = score(model, processor, example, data.parent)
        question = _reply_text(example["messages"][-2])
        by_question[question].append(right)
        nll, count = nll + loss, count + tokens
    every = [r for rights in by_question.values() for r in rights]
    print(f"exact match (teacher-forced): {np.mean(every):.3f} of {len(every)}")
    for question, rights in sorted(by_question.items()):
        print(f"  {question!r}: {np.mean(rights):.3f} of {len(rights)}")
    print(f"reply loss: {nll / count:.4f} per token ({count} tokens)")


if __name__ == "__main__":
    app.run(main)
