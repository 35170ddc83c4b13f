"""The adapter sections of a run's config: config.lora (LoRA, QLoRA, DoRA, AdaLoRA) and
config.prompt (prompt tuning, P-tuning, prefix tuning, NEFTune), as PEFT accepts them."""

from __future__ import annotations

from typing import Any

from sft_jax.adapters.lora import ADAPTER_METHODS, EXTRA_MODULES, PROJECTIONS, names
from sft_jax.adapters.prompts import ENCODERS, INITS, METHODS
from sft_jax.core.errors import check_choice
from sft_jax.core.errors import need as _need
from sft_jax.models.mxfp4 import BLOCK_VALUES as MXFP4_BLOCK
from sft_jax.models.quantize import FORMATS as QUANT_FORMATS
from sft_jax.objectives import registry


def check_lora(config: Any) -> None:
    """config.lora: LoRA, QLoRA, and the adapter method (DoRA, AdaLoRA)."""
    lora = config.lora
    _need(config, lora.rank >= 0, "lora.rank", "0 (full fine-tuning) or a positive adapter rank.")
    if lora.rank:
        _need(config, 0 <= lora.dropout < 1, "lora.dropout", "must be within [0, 1).")
        _need(config, lora.alpha > 0, "lora.alpha", "must be positive.")
        targets = names(lora.target_modules)
        _need(
            config,
            bool(targets),
            "lora.target_modules",
            "no module to adapt: with lora.rank > 0 nothing would train. Name projections "
            "(q_proj, ..., down_proj) or use 'all-linear'.",
        )
        unknown = sorted(set(targets) - {"all-linear", *PROJECTIONS})
        _need(
            config,
            not unknown,
            "lora.target_modules",
            f"unknown {unknown}; use 'all-linear' or names among {', '.join(PROJECTIONS)}.",
        )
    for field in ("expert_adapters", "train_router"):
        _need(
            config,
            lora.rank > 0 or not getattr(lora, field),
            f"lora.{field}",
            "needs LoRA (lora.rank > 0); full fine-tuning trains all of them.",
        )
    extra = names(lora.trainable_modules)
    _need(
        config,
        not set(extra) - set(EXTRA_MODULES),
        "lora.trainable_modules",
        f"expected names among {list(EXTRA_MODULES)}.",
    )
    if lora.quantize:
        _check_quantization(config)
    _check_adapter_method(config)
    _check_vision_targets(config)


def _check_vision_targets(config: Any) -> None:
    """Adapters on the vision part are plain LoRA without dropout (adapters/vision_lora.py);
    which names a model has is checked against it (vision_lora.resolve)."""
    lora = config.lora
    if not names(lora.vision_targets):
        return
    field = "lora.vision_targets"
    _need(config, lora.rank > 0, field, "needs LoRA (lora.rank > 0).")
    _need(
        config,
        lora.method == "lora" and not lora.use_dora,
        field,
        "vision adapters are plain LoRA: turn DoRA / AdaLoRA off, or set lora.vision_targets=''.",
    )
    _need(
        config,
        lora.dropout == 0,
        field,
        "vision adapters train without dropout (PEFT's adapter on a bare parameter refuses "
        "it): set lora.dropout=0, or lora.vision_targets=''.",
    )


def _check_quantization(config: Any) -> None:
    """QLoRA's storage format and block size."""
    lora = config.lora
    _need(
        config,
        lora.quantize in QUANT_FORMATS,
        "lora.quantize",
        f"expected {' or '.join(map(repr, (*QUANT_FORMATS, '')))}.",
    )
    _need(
        config,
        lora.rank > 0,
        "lora.quantize",
        "needs LoRA (lora.rank > 0): quantized weights are frozen.",
    )
    block = lora.quant_block_size
    _need(
        config,
        block > 0 and block % 2 == 0,
        "lora.quant_block_size",
        "weights per scale: a positive even number (64 is the QLoRA default).",
    )
    _need(
        config,
        lora.quantize != "mxfp4" or block == MXFP4_BLOCK,
        "lora.quant_block_size",
        f"lora.quantize='mxfp4' has blocks of {MXFP4_BLOCK} weights: set it to {MXFP4_BLOCK}.",
    )


def _check_adapter_method(config: Any) -> None:
    """DoRA and AdaLoRA: what PEFT accepts (AdaLoraConfig's own checks included)."""
    lora = config.lora
    method = lora.method
    check_choice("lora.method", method, ADAPTER_METHODS)
    if lora.use_dora or method == "adalora":
        _need(
            config,
            lora.rank > 0,
            "lora.use_dora" if method == "lora" else "lora.method",
            "needs adapters: set lora.rank > 0 (AdaLoRA: its initial rank).",
        )
    _need(
        config,
        not lora.expert_adapters or (method == "lora" and not lora.use_dora),
        "lora.expert_adapters",
        "adapters on the experts are plain LoRA: turn DoRA / AdaLoRA off, or set "
        "lora.expert_adapters=False.",
    )
    if method != "adalora":
        return
    _need(
        config,
        not lora.use_dora,
        "lora.use_dora",
        "AdaLoRA does not support DoRA (as PEFT's AdaLoraConfig); set one of them.",
    )
    _need(
        config,
        not lora.use_rslora,
        "lora.use_rslora",
        "AdaLoRA scales by alpha / init_r; rsLoRA does not apply to it.",
    )
    ada = lora.adalora
    _need(
        config,
        0 < ada.target_r <= lora.rank,
        "lora.adalora.target_r",
        f"the average rank kept must be within [1, lora.rank={lora.rank}].",
    )
    _need(config, ada.delta_t >= 1, "lora.adalora.delta_t", "updates between allocations, >= 1.")
    for name in ("beta1", "beta2"):
        _need(config, 0 < getattr(ada, name) < 1, f"lora.adalora.{name}", "must be within (0, 1).")
    _need(config, ada.orth_reg_weight >= 0, "lora.adalora.orth_reg_weight", "must be >= 0.")
    total = ada.total_step or config.train.steps
    counts = ada.total_step >= 0 and ada.tinit >= 0 and ada.tfinal >= 0
    _need(
        config,
        counts,
        "lora.adalora.total_step",
        "total_step, tinit and tfinal are update counts, >= 0.",
    )
    _need(
        config,
        ada.tinit < total - ada.tfinal,
        "lora.adalora.tinit",
        f"tinit={ada.tinit} and tfinal={ada.tfinal} leave no updates to reallocate ranks in "
        f"total_step={total}: decrease them or raise total_step / train.steps.",
    )


def check_prompt(config: Any) -> None:
    """config.prompt (absent in configs saved before it: off) and NEFTune's alpha."""
    alpha = config.train.neftune_noise_alpha
    _need(config, alpha >= 0, "train.neftune_noise_alpha", "must be 0 (off) or positive.")
    prompt = config.prompt
    if not prompt.method:
        return
    _check_prompt_fields(config, prompt)
    _check_prompt_with_the_run(config, prompt)


def _check_prompt_fields(config: Any, prompt: Any) -> None:
    """config.prompt's own fields."""
    check_choice("prompt.method", prompt.method, ("", *METHODS))
    check_choice("prompt.init", prompt.init, INITS)
    check_choice("prompt.encoder_type", prompt.encoder_type, ENCODERS)
    count = prompt.num_virtual_tokens
    _need(config, count > 0, "prompt.num_virtual_tokens", "at least 1 virtual token.")
    if prompt.method != "prefix_tuning":
        _need(
            config,
            count <= config.data.max_length - 2,
            "prompt.num_virtual_tokens",
            f"every document holds the {count} virtual tokens within config.data.max_length="
            f"{config.data.max_length}, leaving no room for its own tokens: use fewer virtual "
            "tokens or a longer max_length.",
        )
    _need(
        config,
        prompt.encoder_hidden_size >= 0,
        "prompt.encoder_hidden_size",
        "0 (the token width) or a positive width.",
    )
    _need(config, prompt.encoder_num_layers >= 1, "prompt.encoder_num_layers", "at least 1.")
    _need(
        config,
        prompt.method != "prompt_tuning" or prompt.init != "text" or bool(prompt.init_text.strip()),
        "prompt.init_text",
        "prompt.init='text' starts the virtual tokens from this text: give one.",
    )


def _check_prompt_with_the_run(config: Any, prompt: Any) -> None:
    """What a prompt method does not combine with: LoRA, other objectives, the context axis,
    the stream loader, the fused attention kernels (prefix tuning)."""
    _need(
        config,
        config.lora.rank == 0 and not config.lora.quantize,
        "lora.rank",
        f"config.prompt.method={prompt.method!r} trains virtual tokens on a frozen model; it "
        "does not combine with LoRA here. Set lora.rank=0 or prompt.method=''.",
    )
    _need(
        config,
        registry.kind_of(config).virtual_tokens,
        "train.objective",
        f"config.prompt.method={prompt.method!r} trains with the SFT objective only.",
    )
    _need(
        config,
        config.mesh.context == 1,
        "mesh.context",
        f"config.prompt.method={prompt.method!r} does not run with the sequence split over "
        "mesh.context yet (its virtual tokens and key/value prefixes sit in every "
        "document): use mesh.context=1.",
    )
    _need(
        config,
        prompt.method == "prefix_tuning" or config.data.loader != "stream",
        "data.loader",
        f"config.prompt.method={prompt.method!r} puts virtual tokens in the "
        "rows of the in-memory loader only so far: use data.loader='memory' (or "
        "prefix_tuning, which adds no tokens to rows).",
    )
    if prompt.method == "prefix_tuning":
        _need(
            config,
            config.model.attention in ("auto", "xla"),
            "model.attention",
            "prefix tuning adds key/value slots the fused kernels (cuDNN's packed layout, "
            "splash) do not take: use 'auto' (which then picks 'xla') or 'xla'.",
        )
