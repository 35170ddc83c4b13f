"""lm-eval model type "sft_jax" with a prompt adapter: a prompt tuning run evaluated as it
trained (its virtual tokens, no export), and a prefix tuning export (base model and adapter/)
with its key/value prefix, against lm-eval's `hf` backend on PEFT's own model (the PEFT adapter
loaded with peft onto the base model). Every request's log-likelihood (rel 1e-4), is_greedy
and rolling log-likelihood equal `hf`'s; greedy generations equal `hf`'s request handling
(truncation, stop strings, decoding) over PEFT's forward pass, token by token (PEFT's own
generate is wrong for these adapters in this version: tests/adapters/test_prompts.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from test_harness import GENERATE, LOGLIKELIHOOD, ROLLING, instances
from test_trainer import base_config
from tiny_tasks import save_model

from sft_jax.adapters.prompts import PromptSpec, apply_prompt, save_prompt_adapter
from sft_jax.core.spec import RunSpec
from sft_jax.data import open_data
from sft_jax.evaluation.harness import SftJaxLM
from sft_jax.loop import export, trainer
from sft_jax.models import from_pretrained
from sft_jax.train import sharding


class PeftForwardLM(HFLM):
    """lm-eval's hf backend whose generation is a greedy loop over the model's forward pass,
    one row at a time (its padding dropped), new tokens padded after the first EOS as
    transformers' generate pads finished rows."""

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        assert not generation_kwargs.get("do_sample")
        mask = generation_kwargs["attention_mask"].bool()
        rows = []
        for ids, real in zip(context, mask, strict=True):
            ids, new = ids[real].tolist(), []
            with torch.no_grad():
                while len(new) < max_length - context.shape[1]:
                    new.append(int(self.model(torch.tensor([ids + new])).logits[0, -1].argmax()))
                    if new[-1] == self.tokenizer.eos_token_id:
                        break
            new += [self.tokenizer.pad_token_id] * (max_length - context.shape[1] - len(new))
            rows.append(context.tolist()[len(rows)] + new)
        return torch.tensor(rows)


def _train(model_dir, tmp_path, method: str):
    """A one-step run of `method` with 3 virtual tokens; its WORKDIR."""
    rows = [
        {"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                      {"role": "assistant", "content": f"Answer {2 * a + 1}"}]}
        for a in range(8)
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config(model_dir, steps=1, learning_rate=0.3)
    config.data.train_files = config.data.eval_files = str(tmp_path / "chat.jsonl")
    config.data.max_length, config.data.cache_dir = 32, "none"
    config.eval.generate_examples = config.eval.show_samples = 0
    config.eval.at_start, config.eval.every_steps = False, 100
    config.lora.rank, config.prompt.method, config.prompt.num_virtual_tokens = 0, method, 3
    config.checkpoint.enabled, config.checkpoint.async_save = True, False
    trainer.run(RunSpec.of(config), tmp_path / "run", data_factory=lambda c, feed: open_data(c))
    return tmp_path / "run"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_model(path)
    return path


def assert_equal_to_peft_in_hf(ours: SftJaxLM, export_dir, base_dir) -> None:
    """Log-likelihoods (rel 1e-4), is_greedy, rolling log-likelihoods and greedy generations
    of `ours` equal lm-eval's hf backend's on PEFT's model of export_dir; the scores differ
    from the base model's."""
    hf = PeftForwardLM(
        pretrained=str(export_dir), peft=str(export_dir / "adapter"), batch_size=4,
        device="cpu", dtype="float32",
    )  # fmt: skip
    requests = instances("loglikelihood", LOGLIKELIHOOD)
    expected, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in expected], rtol=1e-4)
    assert [g for _, g in got] == [g for _, g in expected]
    base = HFLM(pretrained=str(base_dir), batch_size=4, device="cpu", dtype="float32")
    assert not np.allclose(
        [x for x, _ in got], [x for x, _ in base.loglikelihood(requests)], rtol=1e-3
    )  # the adapter changes the scores
    rolling = instances("loglikelihood_rolling", [(t,) for t in ROLLING])
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling), rtol=1e-4
    )
    generate = instances("generate_until", GENERATE[:2])
    assert ours.generate_until(generate) == hf.generate_until(generate)


def test_a_prompt_tuning_run_as_it_trained_equals_peft_in_hf(base_dir, tmp_path):
    """The run's model with its virtual tokens (python -m sft_jax.evaluate --workdir) against
    the run's export (base model + PEFT adapter)."""
    run = _train(base_dir, tmp_path, "prompt_tuning")
    model, tokenizer = export.trained_run_model(run, "last")
    assert model.virtual_tokens is not None
    ours = SftJaxLM(model, tokenizer, batch_size=4)
    assert_equal_to_peft_in_hf(ours, export.export_run(run, which="last"), base_dir)


def test_a_prefix_tuning_export_equals_peft_in_hf(base_dir, tmp_path):
    """An export directory (base model + adapter/ as a prefix tuning run exports it) loads
    with its key/value prefix."""
    shutil.copytree(base_dir, tmp_path / "export")
    spec = PromptSpec("prefix_tuning", 3)
    model = from_pretrained(base_dir, mesh=sharding.single_device_mesh())
    apply_prompt(model, spec, seed=2)
    save_prompt_adapter(model, tmp_path / "export" / "adapter", spec, base_model=str(base_dir))
    ours = SftJaxLM(str(tmp_path / "export"), batch_size=4)
    assert ours.model.kv_prefix is not None and ours.virtual_ids == []
    assert_equal_to_peft_in_hf(ours, tmp_path / "export", base_dir)
