"""The typed run spec: the config's values as frozen dataclasses, one per section.

The ml_collections ConfigDict stays the user interface (`configs/*.py`, `--config.x.y=`
flags); the entry points (main.py, the CLIs, `loop.trainer.run`) turn it into a `RunSpec`
once with `RunSpec.of`, and nothing below them reads the ConfigDict. The defaults live in one
place, `configs/base.py`, which every config starts from: a field missing here is an error
that says so, not a second default. Each field's type is checked here (an int where a float
is expected is widened); what values a field may take is checked by `train.config_check`,
section by section, right after.
"""

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Self

from sft_jax.core.errors import ConfigError, check_choice
from sft_jax.core.saved import SAVED_BEFORE_THE_FIELD

__all__ = ["SAVED_BEFORE_THE_FIELD", "RunSpec", "Section"]


@dataclasses.dataclass(frozen=True)
class Section:
    """One config section; subclasses declare the fields and their types."""

    @classmethod
    def from_mapping(cls, where: str, values: Mapping[str, Any]) -> Self:
        """The section `where` ("" for the whole run) of plain values, each field checked."""
        hints = typing.get_type_hints(cls)
        names = [field.name for field in dataclasses.fields(cls)]
        prefix = f"config.{where}" if where else "config"
        missing = [name for name in names if name not in values]
        if missing:
            raise ConfigError(
                f"{prefix} has no {', '.join(missing)}: a config starts from configs/base.py's "
                "get_config() (`from configs import base`) and changes its fields."
            )
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(
                f"{prefix}.{unknown[0]}: no such field (the fields of {prefix} are "
                f"{', '.join(names)})."
            )
        dotted = f"{where}." if where else ""
        kwargs = {name: _typed(dotted + name, hints[name], values[name]) for name in names}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as the ConfigDict's to_dict() gives them (saved with checkpoints)."""
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def _typed(field: str, hint: Any, value: Any) -> Any:
    """value as the field's declared type; a ConfigError naming the field when it is not."""
    if isinstance(hint, type) and issubclass(hint, Section):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config.{field}={value!r}: expected a section of fields.")
        return hint.from_mapping(field, value)
    origin = typing.get_origin(hint)
    if origin is tuple:  # tuple[Mapping[str, Any], ...]: a list of plain records
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config.{field}={value!r}: expected a list.")
        return tuple(
            types.MappingProxyType(dict(item)) if isinstance(item, Mapping) else item
            for item in value
        )
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"config.{field}={value!r}: expected {hint.__name__}, not {type(value).__name__}."
        )
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [dict(item) for item in value]
    return value


@dataclasses.dataclass(frozen=True)
class ModelSpec(Section):
    name_or_path: str
    param_dtype: str
    compute_dtype: str
    remat: str
    attention: str
    moe_dispatch: str
    train_vision: bool


@dataclasses.dataclass(frozen=True)
class DataSpec(Section):
    train_files: str
    train_split: str
    eval_files: str
    eval_split: str
    eval_max_examples: int
    eval_fraction: float
    format: str
    tokenizer: str
    chat_template: str
    train_on: str
    train_reasoning: str
    template_kwargs: str
    max_length: int
    packing: bool
    max_documents_per_row: int
    max_images_per_row: int
    max_image_patches_per_row: int
    shuffle: bool
    skip_bad_examples: bool
    empty_replies: str
    overlong: str
    num_workers: int
    cache_dir: str
    prefetch: int
    loader: str
    stream_window: int
    mixture: tuple[Mapping[str, Any], ...]
    contamination: str


@dataclasses.dataclass(frozen=True)
class AdaLoraSpec(Section):
    target_r: int
    tinit: int
    tfinal: int
    delta_t: int
    beta1: float
    beta2: float
    orth_reg_weight: float
    total_step: int


@dataclasses.dataclass(frozen=True)
class LoraConfigSpec(Section):
    rank: int
    alpha: float
    dropout: float
    target_modules: str
    use_rslora: bool
    trainable_modules: str
    expert_adapters: bool
    train_router: bool
    vision_targets: str
    quantize: str
    quant_block_size: int
    double_quant: bool
    use_dora: bool
    method: str
    adalora: AdaLoraSpec


@dataclasses.dataclass(frozen=True)
class PromptConfigSpec(Section):
    method: str
    num_virtual_tokens: int
    init: str
    init_text: str
    prefix_projection: bool
    encoder_type: str
    encoder_hidden_size: int
    encoder_num_layers: int


@dataclasses.dataclass(frozen=True)
class TrainSpec(Section):
    objective: str
    steps: int
    global_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    lr_schedule: str
    min_lr_ratio: float
    weight_decay: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    max_grad_norm: float
    seed: int
    loss_chunk_size: int
    z_loss_weight: float
    router_aux_loss_coef: float
    router_z_loss_weight: float
    neftune_noise_alpha: float


@dataclasses.dataclass(frozen=True)
class PreferenceSpec(Section):
    loss_type: str
    beta: float
    label_smoothing: float
    rpo_alpha: float
    simpo_gamma: float
    center_rewards_coefficient: float
    reference: str
    orpo_nll: str
    reference_model: str


@dataclasses.dataclass(frozen=True)
class GRPOConfigSpec(Section):
    num_generations: int
    max_prompt_length: int
    max_completion_length: int
    long_prompts: str
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    loss_type: str
    importance_sampling_level: str
    scale_rewards: str
    epsilon: float
    epsilon_high: float
    delta: float
    beta: float
    mask_truncated_completions: bool
    reward_funcs: str
    reward_weights: str
    num_iterations: int
    max_sampling_logp_difference: float
    importance_sampling_correction: bool
    importance_sampling_mode: str
    importance_sampling_clip_min: float
    importance_sampling_clip_max: float
    eval_samples: int


@dataclasses.dataclass(frozen=True)
class PPOConfigSpec(Section):
    gamma: float
    lam: float
    kl_coef: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    value_model: str


@dataclasses.dataclass(frozen=True)
class EvalSpec(Section):
    every_steps: int
    global_batch_size: int
    at_start: bool
    generate_examples: int
    show_samples: int
    max_new_tokens: int
    harness_tasks: str
    harness_limit: int
    harness_include_path: str
    early_stopping_patience: int
    early_stopping_min_delta: float


@dataclasses.dataclass(frozen=True)
class CheckpointSpec(Section):
    enabled: bool
    every_steps: int
    keep_last: int
    keep_best: int
    async_save: bool
    init_from: str
    staging_dir: str


@dataclasses.dataclass(frozen=True)
class ExportSpec(Section):
    at_end: str
    dir: str


@dataclasses.dataclass(frozen=True)
class LogSpec(Section):
    every_steps: int
    peak_tflops_per_device: float
    trackers: str  # comma-separated (a list in the config is joined)
    run_name: str
    project: str
    wandb_entity: str
    mlflow_tracking_uri: str
    curves: bool

    @classmethod
    def from_mapping(cls, where: str, values: Mapping[str, Any]) -> Self:
        trackers = values.get("trackers")
        if isinstance(trackers, (list, tuple)):  # ("wandb", "mlflow") or ("wandb,mlflow",)
            values = {**values, "trackers": ",".join(map(str, trackers))}
        return super().from_mapping(where, values)

    def tracker_names(self) -> tuple[str, ...]:
        """The trackers named in log.trackers, in order, each once; unknown names refused."""
        names = tuple(dict.fromkeys(n.strip() for n in self.trackers.split(",") if n.strip()))
        for name in names:
            check_choice("log.trackers", name, TRACKERS)
        return names


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # sft_jax/workdir/tracker_backends.py


@dataclasses.dataclass(frozen=True)
class MeshSpec(Section):
    auto: bool
    data: int
    fsdp: int
    tensor: int
    expert: int
    context: int


@dataclasses.dataclass(frozen=True)
class DistributedSpec(Section):
    coordinator_address: str
    num_processes: int
    process_id: int
    cpu_collectives: str
    force: bool


@dataclasses.dataclass(frozen=True)
class RunSpec(Section):
    """A whole run's config, typed: `spec.train.learning_rate` reads as `config.train...`."""

    model: ModelSpec
    data: DataSpec
    lora: LoraConfigSpec
    prompt: PromptConfigSpec
    train: TrainSpec
    preference: PreferenceSpec
    grpo: GRPOConfigSpec
    ppo: PPOConfigSpec
    eval: EvalSpec
    checkpoint: CheckpointSpec
    export: ExportSpec
    log: LogSpec
    mesh: MeshSpec
    distributed: DistributedSpec

    @classmethod
    def of(cls, config: Any) -> "RunSpec":
        """The spec of a ConfigDict (or of a plain dict of sections); a RunSpec as it is."""
        if isinstance(config, RunSpec):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config is a ConfigDict of sections, not {type(config).__name__}")
        return cls.from_mapping("", values)

    @classmethod
    def from_saved(cls, saved_json: str, where: str) -> "RunSpec":
        """The spec a checkpoint's meta saved (`where` names it); fields a run saved before
        they existed take the value that run meant (SAVED_BEFORE_THE_FIELD)."""
        values = json.loads(saved_json)
        for dotted, meant in SAVED_BEFORE_THE_FIELD.items():
            section, name = dotted.split(".")
            values.setdefault(section, {}).setdefault(name, copy.deepcopy(meant))
        try:
            return cls.from_mapping("", values)
        except ConfigError as e:
            raise ConfigError(
                f"{where}: the run's saved config does not fit this sft_jax ({e}); export it "
                "with the sft_jax that trained it."
            ) from e

    def with_values(self, changes: Mapping[str, Any]) -> "RunSpec":
        """A copy with dotted fields changed, e.g. {"mesh.data": 2, "model.remat": "full"}."""
        values = self.to_dict()
        for dotted, value in changes.items():
            section, name = dotted.split(".")
            values[section][name] = value
        return RunSpec.of(values)
