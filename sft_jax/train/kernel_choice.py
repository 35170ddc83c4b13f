"""The kernels a run uses on this machine, chosen with the reason why: the attention kernel
(cuDNN on NVIDIA GPUs, splash on TPUs, blockwise or einsums elsewhere) and the dispatch of the
expert blocks over the expert mesh axis. compile_plan installs what these choose."""

from __future__ import annotations

import jax
import jax.extend

from sft_jax.core.errors import ConfigError, check_choice
from sft_jax.core.spec import DataSpec, RunSpec
from sft_jax.models import ModelConfig
from sft_jax.models.gemma3_vision_config import VisionSpec as Gemma3VisionSpec
from sft_jax.models.kernels.fused import ATTENTION_KINDS, SPLASH_BLOCKS, SPLASH_INTERPRET
from sft_jax.models.kernels.fused import packed_cudnn_supported as _packed_cudnn_supported
from sft_jax.models.partitioning import DISPATCH_KINDS

ATTENTION_CHOICES = ("auto", *ATTENTION_KINDS)
MOE_DISPATCH_CHOICES = ("auto", *DISPATCH_KINDS)
CUDNN_DTYPES = ("bfloat16",)  # cuDNN's flash attention takes 16-bit inputs only
CONTEXT_SPLASH = (
    "auto: splash cannot run with the sequence split over mesh.context (its causal tiles "
    "assume tokens in order); the blockwise kernel holds a block of scores, not [T / C, T]"
)

SINKS_BLOCKWISE = (
    "auto: {}'s attention sinks: the blockwise kernel (flash-style, with sinks; cuDNN and "
    "splash have none)"
)


def accelerator() -> str:
    """'nvidia' (CUDA GPUs), 'tpu', or the backend's name (cpu, rocm GPUs, ...)."""
    backend = jax.extend.backend.get_backend()
    if backend.platform == "gpu" and "cuda" in backend.platform_version.lower():
        return "nvidia"
    return backend.platform


def cudnn_max_head_dim() -> int:
    """cuDNN flash attention's largest head dim on this GPU: 256 from Hopper on, else 128."""
    try:
        return 256 if int(str(jax.devices()[0].compute_capability).split(".")[0]) >= 9 else 128
    except (AttributeError, ValueError):
        return 128


def _cudnn_blocker(accelerator: str, model: ModelConfig, compute_dtype: str, max_head_dim: int):
    if accelerator != "nvidia":
        return f"this run's accelerator is {accelerator}, not an NVIDIA GPU"
    if compute_dtype not in CUDNN_DTYPES:
        return f"config.model.compute_dtype={compute_dtype!r} (cuDNN takes bfloat16)"
    if model.attn_logit_softcap is not None:
        return f"{model.model_type} soft-caps attention logits, which cuDNN cannot"
    if model.attention_sinks:
        return f"{model.model_type} has attention sinks, which cuDNN cannot compute"
    if model.head_dim % 8 or model.head_dim > max_head_dim:
        return f"head_dim {model.head_dim} is not a multiple of 8 up to {max_head_dim} (this GPU)"
    return ""


def _splash_blocker(accelerator: str, max_length: int) -> str:
    tile = SPLASH_BLOCKS[-1]
    if accelerator != "tpu" and not SPLASH_INTERPRET["interpret"]:
        return f"this run's accelerator is {accelerator}, not a TPU"
    if max_length % tile:
        return f"config.data.max_length={max_length} is not a multiple of its {tile}-token tile"
    return ""


def choose_attention(
    requested: str,
    *,
    accelerator: str,
    model: ModelConfig,
    compute_dtype: str,
    max_length: int,
    max_head_dim: int = 256,
    context: int = 1,
) -> tuple[str, str]:
    """(attention kind, why): "auto" takes the fused kernel of this accelerator where the model
    and config allow it (cuDNN on NVIDIA GPUs, splash on TPUs), else the einsum path. Naming a
    kernel the run cannot use is a ConfigError that says why. With the sequence split over a
    context axis of `context` devices, splash ("auto" on a TPU) gives way to blockwise."""
    kind, why = _choose_attention(
        requested, accelerator, model, compute_dtype, max_length, max_head_dim
    )
    if kind == "splash" and context > 1:  # tokens out of order: models/attention.py
        return "blockwise", CONTEXT_SPLASH
    if kind == "blockwise" and context > 1 and model.attention_sinks:
        if requested != "auto":
            raise ConfigError(
                "config.model.attention='blockwise' cannot run with the sequence split over "
                f"mesh.context={context}: its context shards have no attention sinks "
                f"({model.model_type}); set it to 'auto' or 'xla'."
            )
        return "xla", "auto: the blockwise kernel's context shards have no attention sinks"
    return kind, why


def _choose_attention(
    requested: str,
    accelerator: str,
    model: ModelConfig,
    compute_dtype: str,
    max_length: int,
    max_head_dim: int,
) -> tuple[str, str]:
    check_choice("model.attention", requested, ATTENTION_CHOICES)
    sinks = model.attention_sinks and f"{model.model_type} has attention sinks, which splash lacks"
    # Latent attention (DeepSeek-V3, models/mla.py) runs the einsum path only.
    mla = f"{model.model_type}'s latent attention runs the einsum path only" if model.mla else ""
    blockers = {
        "cudnn": mla or _cudnn_blocker(accelerator, model, compute_dtype, max_head_dim),
        "splash": mla or sinks or _splash_blocker(accelerator, max_length),
        "blockwise": mla,
    }
    if requested == "auto":
        if model.attention_sinks and accelerator in ("nvidia", "tpu"):
            return "blockwise", SINKS_BLOCKWISE.format(model.model_type)
        if accelerator == "nvidia" and not blockers["cudnn"]:
            return "cudnn", "auto: fused cuDNN attention on this NVIDIA GPU"
        if accelerator == "tpu" and not blockers["splash"]:
            return "splash", "auto: Pallas splash attention on this TPU"
        blocker = {"nvidia": blockers["cudnn"], "tpu": blockers["splash"]}.get(accelerator)
        why = (
            f"not the fused kernel, as {blocker}"
            if blocker
            else f"no fused kernel on {accelerator}"
        )
        return "xla", f"auto: {why}"
    if blockers.get(requested):
        raise ConfigError(
            f"config.model.attention={requested!r} cannot run: {blockers[requested]}; set it to "
            "'auto' or 'xla'."
        )
    return requested, "as configured"


def choose_moe_dispatch(requested: str) -> tuple[str, str]:
    """(dispatch, why) of the expert blocks over the expert mesh axis. "auto" takes "gather":
    XLA's all-to-all has fixed buffers, so a dropless one sizes each peer's buffer for every
    token copy (N * K rows) and moves top_k times the bytes of gather + reduce-scatter, with
    more memory (benchmarks/bench_moe.py --dispatch; README "Mixture of experts")."""
    check_choice("model.moe_dispatch", requested, MOE_DISPATCH_CHOICES)
    if requested == "auto":
        return "gather", "auto: a dropless fixed-size all-to-all moves top_k times its bytes"
    return requested, "as configured"


def segments_bound(data: DataSpec) -> int:
    """Most segments a row of batches built from this config can hold (documents, plus padding
    as one more), or 0 when unbounded. The data pipeline knows a tighter bound for its data."""
    if not data.packing:
        return 2
    documents = data.max_documents_per_row
    return documents + 1 if documents > 0 else 0


def forced_attention(config: RunSpec, model: ModelConfig | None = None) -> tuple[str, str] | None:
    """(kernel, why) where the run's adapters or model decide the kernel whatever "auto" would
    take; the run (attention_for) and the planner (planning/estimate.planned_attention) ask."""
    if config.prompt.method == "prefix_tuning":
        # config_check allows only auto and xla: the fused kernels take no key/value prefix.
        return "xla", "prefix tuning: the key/value prefix needs the einsum path"
    requested = config.model.attention
    if model is not None and isinstance(model.vision, Gemma3VisionSpec) and requested != "xla":
        if requested != "auto":
            raise ConfigError(
                f"config.model.attention={requested!r} cannot run Gemma 3 with images: its image "
                "tokens attend both ways within their image, which only the einsum path masks; "
                "set it to 'auto' or 'xla'."
            )
        return "xla", (
            "auto: Gemma 3's image tokens attend both ways within their image, which only the "
            "einsum path masks"
        )
    return None


def attention_for(config: RunSpec, model: ModelConfig, max_segments: int) -> tuple[str, str]:
    """(kernel, why) for this run on this machine, the why saying how documents stay apart."""
    here = accelerator()
    forced = forced_attention(config, model)
    if forced is not None:
        return forced
    attention, why = choose_attention(
        config.model.attention,
        accelerator=here,
        model=model,
        compute_dtype=config.model.compute_dtype,
        max_length=config.data.max_length,
        max_head_dim=cudnn_max_head_dim() if here == "nvidia" else 256,
        context=config.mesh.context,
    )
    if config.mesh.context > 1 and attention == "cudnn":
        return attention, why + "; a mask per context shard keeps documents apart"
    if attention == "cudnn":
        why += (
            f"; documents kept apart by a table of {max_segments} segments per row"
            if max_segments and _packed_cudnn_supported()
            else "; documents kept apart by a [B, 1, T, S] mask (the segment table needs a "
            "Hopper GPU and a bound on config.data.max_documents_per_row)"
        )
    return attention, why
