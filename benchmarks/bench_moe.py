"""Tokens/s of our MoE block (dropless ragged_dot dispatch) against transformers' on the same
small config, forward and backward, in one run: a ratio, on whatever device jax and torch see.

  python benchmarks/bench_moe.py [--tokens=2048] [--experts=16] [--top_k=4] [--steps=10] \
      [--blocks=qwen3_moe,gpt_oss]
  # on a GPU (jax on the GPU; transformers' block on torch's device):
  python benchmarks/bench_moe.py --tokens=16384 --hidden=2048 --width=768 --experts=128 \
      --top_k=8 --layers=48 --stack

  # the expert-parallel dispatches (gather vs all_to_all) on 8 simulated CPU devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_moe.py --dispatch

Two blocks (--blocks), each against its transformers module: Qwen3-MoE's (softmax router,
top-k, renormalized) against Qwen3MoeSparseMoeBlock, and gpt-oss's (router with a bias, softmax
over the top-k logits, experts with biases, the clamped SwiGLU at alpha 1.702, limit 7.0)
against GptOssMLP (GptOssTopKRouter + GptOssExperts), its biases random so that they count.
Both sides run float32 with the same weights; jax's step is jitted, torch runs eagerly
(transformers' default). With
--stack it times a whole Qwen3-MoE-shaped decoder stack's train step (jax only) and reports
tokens/s and MFU over active-parameter FLOPs (6 x active matmul parameters per token plus the
causal attention term), given --peak_tflops.

Measured on 2 shared CPU cores (defaults: 2048 tokens, 16 experts, top-4, D 256, F 128), the
outputs checked equal first: ours 957 tokens/s, transformers 1,169 tokens/s, ratio 0.82x (an
earlier run on the same busy machine: 0.95x). Both blocks in one later run, the machine far
busier (load average 17 on its 2 cores, so only the ratios mean something): Qwen3-MoE ours 331
tokens/s, transformers 192, 1.72x; gpt-oss ours 198 tokens/s, transformers 97, 2.04x.
XLA:CPU runs ragged_dot as one dense product per expert over all rows (16 experts: 14x a
plain matmul of the same rows, measured), so on CPU the dropless dispatch does X times the
expert FLOPs; the figure that matters is a GPU's (command above), not measured here (no device
was available to this change).

--dispatch compiles the dispatch alone (forward + backward, random top-k routing) on an expert
axis of every device for each shape and prints, per dispatch, the bytes per device of each
collective in the compiled HLO, XLA's per-device memory (temp + output) and the step time over
gather's; the table it printed is in README "Mixtures of experts".
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from sft_jax.models import CausalLM, from_hf_config
from sft_jax.models.config import ModelConfig
from sft_jax.models.moe import MoEBlock, dropless_experts
from sft_jax.models.moe_gpt_oss import EXPERT_BIASES, GptOssMoEBlock
from sft_jax.models.partitioning import DISPATCH_KINDS, experts_per_shard, named_sharding
from sft_jax.train import sharding
from sft_jax.train.flops import training_flops_per_token

DISPATCH_SHAPES = "256x8x2,256x16x4,1024x16x2,1024x32x8"


def hf_moe_config(args: argparse.Namespace) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.width, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128,
    )  # fmt: skip


def hf_gpt_oss_config(args: argparse.Namespace) -> transformers.GptOssConfig:
    """gpt-oss's expert block on the same shape (its swiglu_alpha 1.702 and limit 7.0)."""
    return transformers.GptOssConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.width,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64,
    )  # fmt: skip


def time_it(fn, steps: int) -> float:
    fn()  # compile / warm up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def ours(config: ModelConfig, x: np.ndarray, steps: int) -> tuple[float, MoEBlock]:
    block_class = GptOssMoEBlock if config.expert_names == "gpt_oss" else MoEBlock
    block = block_class(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    for key, name in enumerate(("router_logit_bias", *EXPERT_BIASES)):
        if hasattr(block, name):  # gpt-oss's biases start at zero: make them count
            bias = getattr(block, name)
            bias[...] = 0.1 * jax.random.normal(jax.random.key(key), bias.shape)
    graphdef, params = nnx.split(block)
    real = jnp.ones(x.shape[:2], bool)

    @jax.jit
    def step(params, x):
        def loss(params, x):
            out, _ = nnx.merge(graphdef, params)(x, real)
            return jnp.sum(out * out)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    x = jnp.asarray(x)
    return time_it(lambda: jax.block_until_ready(step(params, x)), steps), block


def qwen3_moe_block(hf_config, block: MoEBlock) -> torch.nn.Module:
    """transformers' Qwen3MoeSparseMoeBlock holding `block`'s weights."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_block = Qwen3MoeSparseMoeBlock(hf_config).float()
    with torch.no_grad():
        hf_block.gate.weight.copy_(torch.tensor(np.asarray(block.router[...]).T))
        gate_up = np.concatenate(
            [np.asarray(block.experts_gate[...]), np.asarray(block.experts_up[...])], axis=2
        )
        hf_block.experts.gate_up_proj.copy_(torch.tensor(gate_up.transpose(0, 2, 1)))
        hf_block.experts.down_proj.copy_(
            torch.tensor(np.asarray(block.experts_down[...]).transpose(0, 2, 1))
        )
    return hf_block


def gpt_oss_block(hf_config, block: GptOssMoEBlock) -> torch.nn.Module:
    """transformers' GptOssMLP (router + GptOssExperts) holding `block`'s weights: gate and up
    interleaved in gate_up_proj [X, D, 2F] and its bias, down_proj [X, F, D] as ours."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    def interleaved(gate, up) -> torch.Tensor:
        gate, up = np.asarray(gate[...]), np.asarray(up[...])
        return torch.tensor(np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1))

    hf_block = GptOssMLP(hf_config).float()
    with torch.no_grad():
        hf_block.router.weight.copy_(torch.tensor(np.asarray(block.router[...]).T))
        hf_block.router.bias.copy_(torch.tensor(np.asarray(block.router_logit_bias[...])))
        experts = hf_block.experts
        experts.gate_up_proj.copy_(interleaved(block.experts_gate, block.experts_up))
        experts.gate_up_proj_bias.copy_(interleaved(block.experts_gate_bias, block.experts_up_bias))
        experts.down_proj.copy_(torch.tensor(np.asarray(block.experts_down[...])))
        experts.down_proj_bias.copy_(torch.tensor(np.asarray(block.experts_down_bias[...])))
    return hf_block


def theirs(hf_block: torch.nn.Module, block: MoEBlock, x: np.ndarray, steps: int) -> float:
    """Seconds per forward + backward of transformers' block, after checking that its output
    equals ours."""
    x_torch = torch.as_tensor(
        x, device=torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    hf_block.to(x_torch.device)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        out = hf_block(inputs)
        return out[0] if isinstance(out, tuple) else out  # GptOssMLP: (out, router scores)

    with torch.no_grad():  # the same function: outputs agree before anything is timed
        expected = forward(x_torch).cpu().numpy()
    actual, _ = block(jnp.asarray(x), jnp.ones(x.shape[:2], bool))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-3, atol=1e-4)

    def step():
        inputs = x_torch.clone().requires_grad_(True)
        out = forward(inputs)
        (out * out).sum().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return time_it(step, steps)


# Block name -> (its transformers config, transformers' block holding our block's weights).
BLOCKS = {
    "qwen3_moe": (hf_moe_config, qwen3_moe_block),
    "gpt_oss": (hf_gpt_oss_config, gpt_oss_block),
}


def compare_block(name: str, args: argparse.Namespace, x: np.ndarray) -> dict:
    """Tokens/s of our block and transformers' (forward + backward) and their ratio."""
    make_config, make_hf_block = BLOCKS[name]
    hf_config = make_config(args)
    ours_s, block = ours(from_hf_config(hf_config), x, args.steps)
    theirs_s = theirs(make_hf_block(hf_config, block), block, x, args.steps)
    print(f"{name}: ours {args.tokens / ours_s:,.0f} tokens/s, transformers "
          f"{args.tokens / theirs_s:,.0f} tokens/s (forward + backward), "
          f"ratio ours / transformers {theirs_s / ours_s:.2f}x")  # fmt: skip
    return {"ours_tokens_per_sec": args.tokens / ours_s,
            "transformers_tokens_per_sec": args.tokens / theirs_s,
            "ratio": theirs_s / ours_s}  # fmt: skip


def stack(hf_config, args: argparse.Namespace) -> dict:
    """Train-step tokens/s and MFU of a Qwen3-MoE-shaped decoder stack (jax only, bf16)."""
    config = from_hf_config(hf_config)
    model = CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    seq = args.seq_len
    rows = args.tokens // seq
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (rows, seq)), jnp.int32)
    positions = jnp.tile(jnp.arange(seq, dtype=jnp.int32), (rows, 1))
    segments = jnp.ones((rows, seq), jnp.int32)

    @jax.jit
    def step(params):
        def loss(params):
            hidden = nnx.merge(graphdef, params).hidden_states(ids, positions, segments)
            return jnp.mean(jnp.square(hidden.astype(jnp.float32)))

        return jax.grad(loss)(params)

    seconds = time_it(lambda: jax.block_until_ready(step(params)), args.steps)
    tokens_per_s = rows * seq / seconds
    flops = training_flops_per_token(config, seq)
    print(f"stack: {tokens_per_s:,.0f} tokens/s, {flops * tokens_per_s / 1e12:.1f} TFLOP/s")
    if args.peak_tflops:
        print(f"MFU (active parameters): {flops * tokens_per_s / (args.peak_tflops * 1e12):.1%}")
    return {"stack_tokens_per_sec": tokens_per_s, "flops_per_token": flops}


# One collective of a compiled HLO module: its result type(s), its kind, its replica groups.
COLLECTIVE = re.compile(
    r"= (\([^()]*\)|\S+) (all-gather|reduce-scatter|all-to-all|all-reduce|collective-permute)"
    r"(?:-start)?\(.*?replica_groups=(\{\{[0-9,]+\}|\[[0-9]+,[0-9]+\])"
)
ARRAY = re.compile(r"(f32|bf16|s32|f16|u32|pred)\[([0-9,]*)\]")
ITEM_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "u32": 4, "pred": 1}


def collective_bytes(hlo_text: str) -> Counter:
    """Bytes of the buffer each device holds in each kind of collective of a compiled module:
    all-gather's output, reduce-scatter's input (its output times the group), all-to-all's and
    all-reduce's buffers. A ring moves (G - 1) / G of that over the wire."""
    totals: Counter = Counter()
    for result, kind, group in COLLECTIVE.findall(hlo_text):
        size = sum(
            ITEM_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
            for dtype, dims in ARRAY.findall(result)
        )
        # {{0,1,2,3},...} lists the first group; [groups,size]<=[devices] is the iota form
        group_size = len(group.split(",")) if group[0] == "{" else int(group[1:-1].split(",")[1])
        totals[kind] += size * (group_size if kind == "reduce-scatter" else 1)
    return totals


def dispatch_step(args: argparse.Namespace, dispatch: str, mesh):
    """(compiled forward + backward of the expert dispatch alone under `mesh`, its inputs):
    random tokens routed top-k by random logits, the experts' weights split over the axis."""
    tokens = args.tokens * mesh.devices.size
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (tokens, args.hidden))
    logits = jax.random.normal(keys[1], (tokens, args.experts))
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits), args.top_k)
    shape_in, shape_out = (
        (args.experts, args.hidden, args.width),
        (args.experts, args.width, args.hidden),
    )
    stacked = tuple(
        0.1 * jax.random.normal(key, shape)
        for key, shape in zip(keys[2:], (shape_in, shape_in, shape_out), strict=True)
    )
    rows = functools.partial(named_sharding, ("batch", None), mesh=mesh)
    x, experts, weights = (jax.device_put(a, rows(shape=a.shape)) for a in (x, experts, weights))
    stacked = tuple(
        jax.device_put(a, named_sharding(("expert", None, None), a.shape, mesh)) for a in stacked
    )
    local = functools.partial(dropless_experts, activation="silu")

    def loss(x, stacked):
        out = experts_per_shard(local, x, experts, weights, stacked, dispatch=dispatch)
        return jnp.sum(jnp.square(out))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with jax.set_mesh(mesh):
        compiled = step.lower(x, stacked).compile()
    return compiled, (x, stacked)


def compare_dispatch(args: argparse.Namespace) -> dict:
    """Per shape: collective bytes per device, XLA's per-device memory and step time of each
    dispatch, on a mesh of every device as the expert axis."""
    mesh = sharding.make_mesh(fsdp=1, expert=len(jax.devices()))
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices, expert axis of all; "
          f"D {args.hidden}, F {args.width}; bytes and memory per device")  # fmt: skip
    print("| tokens/device | experts | top-k | dispatch | all-gather | reduce-scatter | "
          "all-to-all | memory (temp + out) | step time / gather's |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for tokens, experts, top_k in args.shapes:
        shape = argparse.Namespace(**{**vars(args), "tokens": tokens, "experts": experts,
                                      "top_k": top_k})  # fmt: skip
        seconds = {}
        for dispatch in DISPATCH_KINDS:
            compiled, inputs = dispatch_step(shape, dispatch, mesh)
            seconds[dispatch] = time_it(
                lambda c=compiled, i=inputs: jax.block_until_ready(c(*i)), args.steps
            )
            moved = collective_bytes(compiled.as_text())
            memory = compiled.memory_analysis()
            mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
            print(f"| {tokens} | {experts} | {top_k} | {dispatch} | {mib(moved['all-gather'])} | "
                  f"{mib(moved['reduce-scatter'])} | {mib(moved['all-to-all'])} | "
                  f"{mib(memory.temp_size_in_bytes + memory.output_size_in_bytes)} | "
                  f"{seconds[dispatch] / seconds['gather']:.2f} |")  # fmt: skip
            rows.append({"tokens": tokens, "experts": experts, "top_k": top_k,
                         "dispatch": dispatch, "collective_bytes": dict(moved),
                         "memory_bytes": memory.temp_size_in_bytes + memory.output_size_in_bytes,
                         "step_over_gather": seconds[dispatch] / seconds["gather"]})  # fmt: skip
    return {"dispatch": rows}


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'256x8x2,1024x16x4' -> [(tokens per device, experts, top-k), ...]."""
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=128, help="F of each expert")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (--stack)")
    parser.add_argument("--seq_len", type=int, default=2048, help="(--stack)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stack", action="store_true", help="time a whole decoder stack")
    parser.add_argument("--blocks", default="qwen3_moe,gpt_oss",
                        help=f"blocks to time, of {','.join(BLOCKS)}")  # fmt: skip
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    parser.add_argument("--dispatch", action="store_true",
                        help="compare the expert-parallel dispatches")  # fmt: skip
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DISPATCH_SHAPES),
                        help="--dispatch: TOKENS_PER_DEVICExEXPERTSxTOP_K,...")  # fmt: skip
    args = parser.parse_args()
    if args.dispatch:
        print(json.dumps(compare_dispatch(args)))
        return
    if args.stack:
        print(json.dumps(stack(hf_moe_config(args), args)))
        return
    x = np.random.default_rng(0).standard_normal((1, args.tokens, args.hidden), np.float32)
    print(f"jax {jax.devices()[0].platform}, torch {torch.__version__}, tokens {args.tokens}, "
          f"experts {args.experts}, top-{args.top_k}, D {args.hidden}, F {args.width}")  # fmt: skip
    print(json.dumps({name: compare_block(name, args, x) for name in args.blocks.split(",")}))


if __name__ == "__main__":
    main()
