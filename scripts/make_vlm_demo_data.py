"""Builds the offline image-text demo: synthetic pictures with questions, and a random tiny
Gemma 3 (Gemma3ForConditionalGeneration) with its processor.

Run (deterministic from --seed; rewrites every file under --out):
  python scripts/make_vlm_demo_data.py --out=assets

Writes
  OUT/demo_data/vlm/train.parquet, eval.parquet   TRL's vision format, one conversation a row,
      the pictures' PNG bytes in the row (as `datasets` stores an Image feature):
      messages: [{"role": "user", "content": [{"type": "image"},
                  {"type": "text", "text": "How many circles?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "3"}]}]
      images:   [{"bytes": <PNG, 32 x 32 RGB>, "path": "train_00012.png"}]
  OUT/vlm_demo_model/  config.json, model.safetensors (float32), generation_config.json,
                       tokenizer.json, tokenizer_config.json, processor_config.json,
                       chat_template.jinja (Gemma 3's own)

Questions (one answer word each, so greedy generation is scored by exact match):
  "What colour is the shape?"  -> red / green / blue / yellow       (chance 1/4)
  "What shape is it?"          -> circle / square / triangle        (chance 1/3)
  "How many circles?"          -> 1 / 2 / 3                         (chance 1/3)
  "What word is written?"      -> cat / dog / sun / box             (chance 1/4)
Every picture is drawn anew (random position, size, background), so eval pictures are unseen.
A shape fills most of the picture; the circles to count are large, one to a quarter of the
picture: the model sees 4 x 4 soft tokens, each one 8 x 8 pixel patch (no pooling), a quarter
2 x 2 of them. With 4 x 4 pixel patches pooled 2 x 2 into the same 16 tokens, shape and count
were 45% and 29% after 1500 updates (configs/vlm_demo.py).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import transformers
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "tests" / "data" / "templates" / "google-gemma-3-it.jinja"

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "assets", "Output directory (demo_data/vlm/ and vlm_demo_model/).")
flags.DEFINE_integer("seed", 0, "Seed of the pictures, the questions and the weights.")
flags.DEFINE_integer("train_size", 8000, "Conversations in train.jsonl.")
flags.DEFINE_integer("eval_size", 200, "Conversations in eval.jsonl.")
flags.DEFINE_integer("image_size", 32, "Picture side in pixels (the processor's size too).")
flags.DEFINE_integer("patch_size", 8, "Vision patch side: (image_size / patch_size)^2 patches.")
flags.DEFINE_integer("tokens_per_image", 16, "Soft tokens per image after pooling (a square).")
flags.DEFINE_integer("backgrounds", 3, "Background shades of the shapes and circles (1 = white).")
flags.DEFINE_integer("hidden_size", 96, "Width of the language model and of the vision tower.")
flags.DEFINE_integer("num_layers", 2, "Layers of the language model and of the vision tower.")

# ---------------------------------------------------------------- pictures
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220),
           "yellow": (230, 200, 20)}  # fmt: skip
BACKGROUNDS = ((255, 255, 255), (200, 200, 200), (40, 40, 40))
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "box")


def _canvas(rng: random.Random, size: int) -> tuple[PIL.Image.Image, PIL.ImageDraw.ImageDraw]:
    image = PIL.Image.new("RGB", (size, size), rng.choice(BACKGROUNDS[: FLAGS.backgrounds]))
    return image, PIL.ImageDraw.Draw(image)


def _shape(draw: PIL.ImageDraw.ImageDraw, shape: str, box: tuple, fill: tuple) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def one_shape(rng: random.Random, size: int) -> tuple[PIL.Image.Image, str, str]:
    """A picture of one shape; its colour and its shape name."""
    image, draw = _canvas(rng, size)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    side = rng.randint(size * 3 // 4, size)
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    _shape(draw, shape, (left, top, left + side - 1, top + side - 1), COLOURS[colour])
    return image, colour, shape


def circles(rng: random.Random, size: int) -> tuple[PIL.Image.Image, str]:
    """1 to 3 large circles of one colour, each in its own quarter of the picture; their count."""
    image, draw = _canvas(rng, size)
    count, fill = rng.randint(1, 3), COLOURS[rng.choice(list(COLOURS))]
    half = size // 2
    for quarter in rng.sample(range(4), count):
        radius = rng.randint(half * 5 // 16, half * 7 // 16)
        low, high = radius, half - radius - 1
        x = half * (quarter % 2) + rng.randint(low, high)
        y = half * (quarter // 2) + rng.randint(low, high)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    return image, str(count)


def word(rng: random.Random, size: int) -> tuple[PIL.Image.Image, str]:
    """A word in a dark colour on a light background; the word."""
    image = PIL.Image.new("RGB", (size, size), rng.choice(BACKGROUNDS[:2]))
    text, font = rng.choice(WORDS), PIL.ImageFont.load_default(size=12)
    left, top, right, bottom = PIL.ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    x = rng.randint(-left, size - right)
    y = rng.randint(-top, size - bottom)
    PIL.ImageDraw.Draw(image).text((x, y), text, fill=(0, 0, 0), font=font)
    return image, text


def example(rng: random.Random, size: int) -> tuple[PIL.Image.Image, str, str]:
    """(picture, question, answer), the four kinds equally often."""
    kind = rng.randrange(4)
    if kind < 2:
        image, colour, shape = one_shape(rng, size)
        if kind == 0:
            return image, "What colour is the shape?", colour
        return image, "What shape is it?", shape
    if kind == 2:
        image, count = circles(rng, size)
        return image, "How many circles?", count
    image, text = word(rng, size)
    return image, "What word is written?", text


def write_split(folder: Path, name: str, count: int, rng: random.Random, size: int) -> None:
    """folder/name.parquet: the conversations with their pictures' PNG bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list] = {"messages": [], "images": []}
    for index in range(count):
        image, question, answer = example(rng, size)
        png = io.BytesIO()
        image.save(png, format="PNG", optimize=True)
        user = [{"type": "image", "text": None}, {"type": "text", "text": question}]
        rows["messages"].append(
            [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        )
        rows["images"].append([{"bytes": png.getvalue(), "path": f"{name}_{index:05d}.png"}])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / f"{name}.parquet", compression="zstd")


# ---------------------------------------------------------------- model and processor
BOI, IMAGE, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, IMAGE]
PIECES = r"\s+|\w+|[^\w\s]"  # words, punctuation and whitespace runs are one token each


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the demo's words with Gemma 3's special tokens."""
    import tokenizers

    words = "user model What colour is the shape it How many circles word written ?"
    answers = [*COLOURS, *SHAPES, *WORDS, "1", "2", "3", "4"]
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for piece in [*words.split(), *answers, " ", "\n", "\n\n", "\n\n\n"]:
        vocab.setdefault(piece, len(vocab))
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(PIECES), behavior="isolated"
    )
    backend.decoder = tokenizers.decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": BOI, "image_token": IMAGE, "eoi_token": EOI},
    )  # fmt: skip


def processor() -> transformers.Gemma3Processor:
    size = FLAGS.image_size
    images = transformers.Gemma3ImageProcessorPil(size={"height": size, "width": size})
    return transformers.Gemma3Processor(
        image_processor=images,
        tokenizer=tokenizer(),
        image_seq_length=FLAGS.tokens_per_image,
        chat_template=TEMPLATE.read_text(encoding="utf-8"),
    )


def model_config(text_tokens: transformers.PreTrainedTokenizerFast) -> transformers.Gemma3Config:
    width, layers = FLAGS.hidden_size, FLAGS.num_layers
    text = {
        "vocab_size": len(text_tokens), "hidden_size": width, "intermediate_size": 2 * width,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": width // 4, "query_pre_attn_scalar": width // 4, "sliding_window": 64,
        "layer_types": ["sliding_attention"] * (layers - 1) + ["full_attention"],
        "max_position_embeddings": 256, "pad_token_id": text_tokens.pad_token_id,
        "bos_token_id": text_tokens.bos_token_id, "eos_token_id": text_tokens.eos_token_id,
    }  # fmt: skip
    vision = {
        "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
        "num_attention_heads": 2, "image_size": FLAGS.image_size, "patch_size": FLAGS.patch_size,
        "vision_use_head": False,
    }  # fmt: skip
    return transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=FLAGS.tokens_per_image,
        image_token_index=text_tokens.image_token_id,
        boi_token_index=text_tokens.boi_token_id,
        eoi_token_index=text_tokens.eoi_token_id,
    )


def write_model(folder: Path) -> None:
    parts = processor()
    text_tokens = parts.tokenizer
    torch.manual_seed(FLAGS.seed)
    model = transformers.Gemma3ForConditionalGeneration(model_config(text_tokens)).float()
    # Gemma 3 stops at <end_of_turn> as well as <eos>, as the hub's generation_config says.
    end_of_turn = text_tokens.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config.eos_token_id = [text_tokens.eos_token_id, end_of_turn]
    model.generation_config.pad_token_id = text_tokens.pad_token_id
    model.save_pretrained(folder)
    parts.save_pretrained(folder)


def main(argv: list[str]) -> None:
    del argv
    out = Path(FLAGS.out)
    data = out / "demo_data" / "vlm"
    rng = random.Random(FLAGS.seed)
    write_split(data, "train", FLAGS.train_size, rng, FLAGS.image_size)
    write_split(data, "eval", FLAGS.eval_size, rng, FLAGS.image_size)
    write_model(out / "vlm_demo_model")


if __name__ == "__main__":
    app.run(main)
