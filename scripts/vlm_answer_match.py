"""Exact match of the image-text demo per question: the trainer's greedy replies, or transformers'.

  python scripts/vlm_answer_match.py --metrics=/tmp/vlm_demo/metrics.jsonl
tallies, for each eval of a run, the trainer's greedy replies to the eval pictures by question
(their eval/samples: run with --config.eval.show_samples=200 to log every one).

  python scripts/vlm_answer_match.py --model=/tmp/vlm_demo/export \
      --processor=assets/vlm_demo_model --data=assets/demo_data/vlm/eval.parquet
scores a Hugging Face model by transformers, teacher-forced: an example counts when the argmax
at every position of its last reply's tokens and of its <end_of_turn> is that token, by
induction exactly the examples greedy generation answers right. Prints the share over all
examples and per question, and the mean loss of those tokens.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers


def examples(path: Path) -> list[dict]:
    """The conversations of a vision-format .parquet (PNG bytes in its rows) or .jsonl file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _image(value, folder: Path) -> PIL.Image.Image:
    """A row's image: {"bytes": ..., "path": ...} as Parquet stores it, or a path."""
    if isinstance(value, dict) and value.get("bytes"):
        return PIL.Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    return PIL.Image.open(folder / (value["path"] if isinstance(value, dict) else value)).convert(
        "RGB"
    )


def _messages(example: dict, folder: Path) -> list[dict]:
    """The messages without the last reply, each image part holding its PIL image."""
    images = iter(_image(value, folder) for value in example["images"])
    messages = []
    for message in example["messages"][:-1]:
        content = message["content"]
        if isinstance(content, list):
            content = [_part(p, images) for p in content]
        messages.append({**message, "content": content})
    return messages


def _part(part: dict, images) -> dict:
    """A content part as the processor takes it (Parquet's null fields left out)."""
    part = {key: value for key, value in part.items() if value is not None}
    return {**part, "image": next(images)} if part["type"] == "image" else part


def _reply_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text") or "" for p in content)


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


def _print(by_question: dict[str, list[bool]], title: str) -> None:
    every = [r for rights in by_question.values() for r in rights]
    print(f"{title}: {np.mean(every):.3f} of {len(every)}")
    for question, rights in sorted(by_question.items()):
        print(f"  {question!r}: {np.mean(rights):.3f} of {len(rights)}")


def tally_samples(metrics: Path) -> None:
    """Per eval of a run: the share of its greedy replies that match, by question."""
    from sft_jax.generation.samples import sample_rows

    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if not record.get("eval/samples"):
            continue
        by_question = collections.defaultdict(list)
        for _, verdict, prompt, _, _ in sample_rows(record["eval/samples"]):
            question = re.findall(r"(?:What|How)[^?]*\?", prompt)[-1]
            by_question[question].append(verdict == "match")
        _print(
            by_question,
            f"step {record['step']}: greedy exact match (eval/exact_match "
            f"{record['eval/exact_match']:.3f})",
        )


def main() -> None:
    # argparse, not absl flags: the demo's test imports this module beside our absl CLIs.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/vlm_demo_model", help="HF model folder")
    parser.add_argument("--processor", default="", help="its processor's folder ('' = --model)")
    parser.add_argument("--data", default="assets/demo_data/vlm/eval.parquet")
    parser.add_argument("--metrics", default="", help="a run's metrics.jsonl: tally its samples")
    args = parser.parse_args()
    if args.metrics:
        tally_samples(Path(args.metrics))
        return
    processor = transformers.AutoProcessor.from_pretrained(args.processor or args.model)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(args.model).eval()
    data = Path(args.data)
    by_question, nll, count = collections.defaultdict(list), 0.0, 0
    for example in examples(data):
        right, loss, tokens = score(model, processor, example, data.parent)
        question = _reply_text(example["messages"][-2])
        by_question[question].append(right)
        nll, count = nll + loss, count + tokens
    _print(by_question, "exact match (teacher-forced)")
    print(f"reply loss: {nll / count:.4f} per token ({count} tokens)")


if __name__ == "__main__":
    main()
