"""Images/s and tokens/s of an image-text model's training step, sft_jax vs transformers + PyTorch,
as a ratio measured in one process: Gemma 3 (Gemma3ForConditionalGeneration) and Qwen2.5-VL.

  python benchmarks/bench_vlm.py [--families=gemma3,qwen2_5_vl] [--shape=small] [--batch=4] \
      [--images=2] [--text=128] [--steps=5] [--warmup=1] [--torch_threads=1] [--train_vision]
  # on a GPU (benchmarks/gpu_check.sh step vlm):
  python benchmarks/bench_vlm.py --shape=medium --batch=8 --images=2 --text=512 \
      --dtype=bfloat16 --steps=10 --warmup=2

Random weights (no download): transformers builds each family's model from a config of the
shape (both towers scaled down), seeded, and writes it to a temp directory; sft_jax loads that
checkpoint as the trainer does. The rows are the same on both sides: each row is --text random
text tokens around --images random images, each image as the model's processor gives it (the
real image processor: Gemma3ImageProcessorPil, Qwen2VLImageProcessorPil) between its start and
end markers with its run of image tokens; sft_jax's image arrays come from those processor
outputs through the family's row layout (models/image_rows.py, what the data layer packs). Every
row has the same length, one document, no padding. Image tokens are never trained (sft_jax's
target_mask; PyTorch's labels -100).

sft_jax runs the trainer's own path: build_model, then compiled.plan_run (the attention kernel
it chooses, the compiled train step with AdamW and gradient clipping, and its eval step), the
batch placed with sharding.device_batch. PyTorch runs forward, cross-entropy over the same
targets, loss.backward(), clip_grad_norm_(1.0), AdamW.step() (lr 1e-5, betas 0.9/0.95, no
weight decay), eager (transformers' default), SDPA attention. The vision tower and projector
(Gemma 3: vision_tower + multi_modal_projector; Qwen2.5-VL: visual, its merger included) are
frozen on both sides unless --train_vision; the trainable parameter counts are checked equal,
and so are both sides' losses on the first step (the same function of the same weights).

Timing: after --warmup steps (compilation, the optimizer's state), --steps repetitions in
which each side runs one train step, then one forward (the eval step: forward + loss; PyTorch
under no_grad), alternating ours and theirs so that a busy machine slows both alike; the
median of each. Ratios are ours / transformers of images/s and tokens/s (the same figure for
both, since the rows are the same). jax and torch each on their default device. --dtype is the
compute dtype: sft_jax keeps float32 parameters; PyTorch keeps its parameters in --dtype on a
GPU, float32 on CPU (as bench_train.py). On a GPU use bfloat16: in float32 XLA's matmuls may use
TF32 where PyTorch's do not. On CPU only the ratios mean something; absolute figures belong to a
GPU (benchmarks/gpu_check.sh step vlm: --shape=medium, bfloat16).

Measured on 2 shared, loaded CPU cores (--steps=7 --torch_threads=1, the defaults otherwise;
docs/benchmarks.md): ours / transformers train step 0.95x (Gemma 3), 0.89x (Qwen2.5-VL),
forward 1.25x, 1.22x (two earlier runs: train step 0.81x to 0.89x). With PyTorch's default 2
threads on those busy cores its step took ~10x as long (ratios 4.23x, 3.62x), so pin it there
(--torch_threads=1).
"""

from __future__ import annotations

import os

# On a GPU, jax must leave memory to PyTorch in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
import transformers

from sft_jax.core.batch import FIELDS
from sft_jax.core.spec import RunSpec
from sft_jax.data.vision_source import budget_layout, step_images
from sft_jax.train import sharding
from sft_jax.train.compiled import plan_run
from sft_jax.train.setup import build_model

REPO = Path(__file__).resolve().parents[1]  # configs/base.py lives there
FAMILIES = ("gemma3", "qwen2_5_vl")

# Text model (D, F, layers, heads, kv heads, vocab) and vision tower (Dv, Fv, layers, heads,
# image side in pixels, patch side; Gemma 3's soft tokens per image).
SHAPES = {
    "micro": {"hidden": 32, "width": 64, "layers": 1, "heads": 2, "kv_heads": 1, "vocab": 256,
              "vision_hidden": 16, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
              "image": 16, "patch": 4, "soft_tokens": 4},
    "small": {"hidden": 256, "width": 1024, "layers": 4, "heads": 4, "kv_heads": 2,
              "vocab": 8192, "vision_hidden": 192, "vision_width": 768, "vision_layers": 4,
              "vision_heads": 3, "image": 224, "patch": 14, "soft_tokens": 16},
    # For a GPU: ~0.2B text, ~0.1B vision parameters, 448-pixel images (1,024 patches each).
    "medium": {"hidden": 1024, "width": 4096, "layers": 8, "heads": 8, "kv_heads": 4,
               "vocab": 32768, "vision_hidden": 768, "vision_width": 3072, "vision_layers": 12,
               "vision_heads": 12, "image": 448, "patch": 14, "soft_tokens": 64},
}  # fmt: skip
# Special token ids, at the top of the vocabulary: (image, start, end, video).
SPECIAL = (-1, -2, -3, -4)


def _special(shape: dict) -> tuple[int, ...]:
    return tuple(shape["vocab"] + offset for offset in SPECIAL)


def _text_fields(shape: dict) -> dict[str, Any]:
    return {"vocab_size": shape["vocab"], "hidden_size": shape["hidden"],
            "intermediate_size": shape["width"], "num_hidden_layers": shape["layers"],
            "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
            "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0}  # fmt: skip


def gemma3_config(shape: dict) -> transformers.Gemma3Config:
    image, start, end, _ = _special(shape)
    head_dim = shape["hidden"] // shape["heads"]
    text = {**_text_fields(shape), "head_dim": head_dim, "query_pre_attn_scalar": head_dim}
    vision = {"hidden_size": shape["vision_hidden"], "intermediate_size": shape["vision_width"],
              "num_hidden_layers": shape["vision_layers"],
              "num_attention_heads": shape["vision_heads"], "image_size": shape["image"],
              "patch_size": shape["patch"], "vision_use_head": False}  # fmt: skip
    return transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=shape["soft_tokens"],
        image_token_index=image, boi_token_index=start, eoi_token_index=end,
    )  # fmt: skip


def qwen2_5_vl_config(shape: dict) -> transformers.Qwen2_5_VLConfig:
    image, start, end, video = _special(shape)
    half = shape["hidden"] // shape["heads"] // 2  # M-RoPE's frequencies: (t, h, w) sections
    temporal = half // 4
    section = [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]
    rope = {"rope_type": "default", "mrope_section": section, "rope_theta": 1e4}
    vision = {"depth": shape["vision_layers"], "hidden_size": shape["vision_hidden"],
              "intermediate_size": shape["vision_width"], "num_heads": shape["vision_heads"],
              "patch_size": shape["patch"], "temporal_patch_size": 2, "spatial_merge_size": 2,
              "window_size": 4 * shape["patch"], "out_hidden_size": shape["hidden"],
              "fullatt_block_indexes": [shape["vision_layers"] - 1]}  # fmt: skip
    return transformers.Qwen2_5_VLConfig(
        text_config={**_text_fields(shape), "rope_parameters": rope}, vision_config=vision,
        image_token_id=image, video_token_id=video, vision_start_token_id=start,
        vision_end_token_id=end,
    )  # fmt: skip


def image_processor(family: str, shape: dict) -> Any:
    """The family's real image processor, at images of the shape's side."""
    side = shape["image"]
    if family == "gemma3":
        return transformers.Gemma3ImageProcessorPil(size={"height": side, "width": side})
    return transformers.Qwen2VLImageProcessorPil(
        patch_size=shape["patch"], temporal_patch_size=2, merge_size=2,
        min_pixels=side * side, max_pixels=side * side,
    )  # fmt: skip


# family -> (its transformers config of a shape, its model class, prefixes of its vision part)
MODELS = {
    "gemma3": (gemma3_config, transformers.Gemma3ForConditionalGeneration,
               ("model.vision_tower.", "model.multi_modal_projector.")),
    "qwen2_5_vl": (qwen2_5_vl_config, transformers.Qwen2_5_VLForConditionalGeneration,
                   ("model.visual.",)),
}  # fmt: skip


# ---------------------------------------------------------------- the rows


def documents(family: str, shape: dict, args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """One document per row: the processor's outputs of its --images random images, and its ids
    (text, then each image's start marker, image tokens, end marker and a share of the text)."""
    image, start, end, _ = _special(shape)
    processor = image_processor(family, shape)
    rng = np.random.default_rng(0)
    side = shape["image"]
    out = []
    for _ in range(args.batch):
        images = [rng.integers(0, 256, (side, side, 3), np.uint8) for _ in range(args.images)]
        processed = {k: np.asarray(v) for k, v in processor(images, return_tensors="np").items()}
        if family == "gemma3":
            runs = [shape["soft_tokens"]] * args.images
        else:  # each image's merged patches (2 x 2 patches per token)
            runs = [int(np.prod(grid)) // 4 for grid in processed["image_grid_thw"]]
        shares = np.array_split(rng.integers(4, image - 8, args.text), args.images + 1)
        ids = list(shares[0])
        for run, text in zip(runs, shares[1:], strict=True):
            ids += [start, *[image] * run, end, *text]
        out.append({"input_ids": np.asarray(ids, np.int64), **processed})
    return out


def our_batch(docs: list[dict], layout: Any, image_token: int) -> dict[str, np.ndarray]:
    """sft_jax's batch of the documents (one a row, as data/batches.make_rows lays them out)."""
    ids = np.stack([d["input_ids"] for d in docs]).astype(np.int32)
    rows, length = ids.shape
    batch = {
        "input_ids": ids,
        "target_ids": np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1),
        "target_mask": np.concatenate(
            [ids[:, 1:] != image_token, np.zeros((rows, 1), bool)], axis=1
        ),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, length), np.int32),
    }
    per_row = [layout.row([doc]) for doc in docs]
    for name in layout.fields:
        batch[name] = np.stack([row[name] for row in per_row]).astype(FIELDS[name].dtype)
    return batch


# ---------------------------------------------------------------- sft_jax


def run_config(args: argparse.Namespace, checkpoint: str, seq: int, patches: int) -> RunSpec:
    """configs/base.py with the fields that build the model, its rows and optimizer set."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from configs import base

    config = base.get_config()
    overrides = {
        "model": {"name_or_path": checkpoint, "param_dtype": "float32",
                  "compute_dtype": args.dtype, "remat": "none", "attention": "auto",
                  "train_vision": args.train_vision},
        "data": {"max_length": seq, "packing": True, "max_documents_per_row": 1,
                 "max_images_per_row": args.images, "max_image_patches_per_row": patches},
        "train": {"seed": 0, "steps": args.warmup + args.steps + 1, "learning_rate": 1e-5,
                  "warmup_steps": 0, "lr_schedule": "constant", "min_lr_ratio": 1.0,
                  "weight_decay": 0.0, "adam_b1": 0.9, "adam_b2": 0.95, "adam_eps": 1e-8,
                  "max_grad_norm": 1.0, "global_batch_size": args.batch},
        "eval": {"global_batch_size": args.batch},
    }  # fmt: skip
    for section, fields in overrides.items():
        for name, value in fields.items():
            setattr(config[section], name, value)
    return RunSpec.of(config)


class Ours:
    """The trainer's compiled train and eval steps on the batch, state carried across calls."""

    def __init__(self, args: argparse.Namespace, checkpoint: str, docs: list[dict], shape: dict):
        seq = len(docs[0]["input_ids"])
        patches = max(len(d["pixel_values"]) for d in docs)
        config = run_config(args, checkpoint, seq, patches)
        mesh = sharding.mesh_for(config)
        model, _, trainable = build_model(config, mesh)
        layout = budget_layout(config, model.config)
        plan = plan_run(
            config, mesh, model, seq_len=seq, max_segments=1, trainable=trainable,
            images=step_images(layout)["images"],
        )  # fmt: skip
        self.steps, self.state, self.attention = plan.steps, plan.state, plan.attention
        batch = our_batch(docs, layout, _special(shape)[0])
        self.batch = sharding.device_batch(batch, self.steps.batch_shardings)
        self.trainable = sum(int(x.size) for x in jax.tree.leaves(self.state["params"]))
        self.loss = float("nan")

    def train(self) -> None:
        self.state, metrics = self.steps.train(self.state, self.batch)
        loss = jax.block_until_ready(metrics["train/loss"])
        if self.loss != self.loss:  # the first step's: before any update
            self.loss = float(loss)

    def forward(self) -> None:
        jax.block_until_ready(self.steps.eval(self.state["params"], self.batch))


# ---------------------------------------------------------------- transformers + PyTorch


class Theirs:
    """transformers' model from the same checkpoint: forward, loss, backward, clip, AdamW."""

    def __init__(self, family: str, checkpoint: str, docs: list[dict], shape: dict, args):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_class, frozen = MODELS[family][1:]
        # Parameters in --dtype on a GPU, float32 on CPU (as bench_train.py).
        dtype = getattr(torch, args.dtype) if self.device.type == "cuda" else torch.float32
        model = model_class.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
        model = model.to(self.device).train()
        for name, param in model.named_parameters():
            param.requires_grad_(args.train_vision or not name.startswith(frozen))
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=0.0)  # fmt: skip
        self.inputs, self.labels = self._inputs(family, docs, _special(shape)[0])
        self.loss = float("nan")

    def _inputs(self, family: str, docs: list[dict], image_token: int) -> tuple[dict, Any]:
        ids = torch.as_tensor(np.stack([d["input_ids"] for d in docs]), device=self.device)
        images = ids == image_token
        pixels = np.concatenate([d["pixel_values"] for d in docs])
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.as_tensor(pixels, device=self.device),
        }
        if family == "gemma3":  # image tokens attend both ways within their image
            inputs["token_type_ids"] = images.long()
        else:
            grids = np.concatenate([d["image_grid_thw"] for d in docs])
            inputs["image_grid_thw"] = torch.as_tensor(grids, device=self.device)
            inputs["mm_token_type_ids"] = images.long()
        labels = torch.where(images, -100, ids)[:, 1:]
        return inputs, labels

    def _loss(self) -> torch.Tensor:
        logits = self.model(**self.inputs).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), self.labels.flatten(), ignore_index=-100
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train(self) -> None:
        loss = self._loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss != self.loss:
            self.loss = float(loss.detach())
        self._sync()

    def forward(self) -> None:
        with torch.no_grad():
            self._loss()
        self._sync()


# ---------------------------------------------------------------- timing and report


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(sides: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median seconds of each side's train step and forward, the sides alternating."""
    for _ in range(args.warmup):
        for side in sides.values():
            side.train()
            side.forward()
    times = {name: {"train": [], "forward": []} for name in sides}
    for _ in range(args.steps):
        for name, side in sides.items():
            times[name]["train"].append(_seconds(side.train))
            times[name]["forward"].append(_seconds(side.forward))
    return {name: {kind: statistics.median(t) for kind, t in kinds.items()}
            for name, kinds in times.items()}  # fmt: skip


def compare(family: str, args: argparse.Namespace) -> dict:
    """Build both sides of a family on the same checkpoint and rows; time them; the figures."""
    shape = SHAPES[args.shape]
    hf_config, model_class, _ = MODELS[family]
    docs = documents(family, shape, args)
    with tempfile.TemporaryDirectory() as checkpoint:
        torch.manual_seed(0)
        transformers.utils.logging.disable_progress_bar()
        model_class(hf_config(shape)).save_pretrained(checkpoint)
        ours = Ours(args, checkpoint, docs, shape)
        theirs = Theirs(family, checkpoint, docs, shape, args)
    if ours.trainable != theirs.trainable:
        raise SystemExit(f"{family}: {ours.trainable} trainable parameters in sft_jax, "
                         f"{theirs.trainable} in transformers: not the same training")  # fmt: skip
    seconds = interleaved({"ours": ours, "theirs": theirs}, args)
    if not np.isclose(ours.loss, theirs.loss, rtol=1e-3 if args.dtype == "float32" else 3e-2):
        raise SystemExit(f"{family}: first-step loss {ours.loss} (sft_jax) vs {theirs.loss} "
                         "(transformers): not the same function")  # fmt: skip
    images, tokens = args.batch * args.images, args.batch * len(docs[0]["input_ids"])
    result = {"seq": tokens // args.batch, "trainable_params": ours.trainable,
              "attention": ours.attention, "loss": ours.loss,
              "loss_transformers": theirs.loss}  # fmt: skip
    for side in ("ours", "theirs"):
        for kind in ("train", "forward"):
            result[f"{side}_{kind}_images_per_s"] = images / seconds[side][kind]
            result[f"{side}_{kind}_tokens_per_s"] = tokens / seconds[side][kind]
    for kind in ("train", "forward"):
        result[f"{kind}_ratio"] = seconds["theirs"][kind] / seconds["ours"][kind]
    return result


def print_table(results: dict[str, dict]) -> None:
    print("| family | side | train images/s | train tokens/s | forward images/s | "
          "forward tokens/s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for family, r in results.items():
        for side, name in (("ours", "sft_jax"), ("theirs", "transformers")):
            print(f"| {family} | {name} | {r[f'{side}_train_images_per_s']:,.2f} | "
                  f"{r[f'{side}_train_tokens_per_s']:,.0f} | "
                  f"{r[f'{side}_forward_images_per_s']:,.2f} | "
                  f"{r[f'{side}_forward_tokens_per_s']:,.0f} |")  # fmt: skip
    for family, r in results.items():
        print(f"{family}: ratio ours / transformers (images/s and tokens/s): train step "
              f"{r['train_ratio']:.2f}x, forward {r['forward_ratio']:.2f}x; first-step loss "
              f"{r['loss']:.5f} vs {r['loss_transformers']:.5f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated, among {FAMILIES}")  # fmt: skip
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4, help="rows, one document each")
    parser.add_argument("--images", type=int, default=2, help="images per row")
    parser.add_argument("--text", type=int, default=128, help="text tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (sft_jax keeps float32 parameters; PyTorch's "
                        "parameters in it on a GPU, float32 on CPU)")  # fmt: skip
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="PyTorch's intra-op threads (0: its default)")  # fmt: skip
    parser.add_argument("--train_vision", action="store_true",
                        help="train the vision tower and projector too")  # fmt: skip
    args = parser.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families or set(families) - set(FAMILIES):
        parser.error(f"--families={args.families}: expected a comma-separated list of {FAMILIES}")
    if args.images < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--images, --steps and --warmup must be at least 1")
    if args.torch_threads:  # on busy cores, threads that wait on each other slow PyTorch
        torch.set_num_threads(args.torch_threads)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"jax {jax.devices()[0].device_kind}, torch {device}; shape {args.shape}, batch "
          f"{args.batch} rows x {args.images} images + {args.text} text tokens, {args.dtype}, "
          f"vision {'trained' if args.train_vision else 'frozen'}, "
          f"{torch.get_num_threads()} PyTorch threads")  # fmt: skip
    results = {family: compare(family, args) for family in families}
    print_table(results)
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
