"""Generation: greedy equals transformers, batched equals alone, stops, sampling, one compile."""

from __future__ import annotations

import io
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from absl import flags
from hf_models import VOCAB
from test_models import jax_logits

from sft_jax.adapters.lora import LoRASpec, apply_lora, merged
from sft_jax.cli import chat
from sft_jax.generation.sampler import (
    chat_prompt_ids,
    chat_stop_token_ids,
    generate,
    left_pad,
    nucleus,
)
from sft_jax.models import from_pretrained
from sft_jax.models.decoder import CausalLM, decoder_linears
from sft_jax.models.kv_cache import KVCache
from sft_jax.models.quantize import QuantSpec
from sft_jax.train import sharding

EOS = 2
# Different lengths; with 16 new tokens every row outgrows the families' 5-token windows.
PROMPTS = [[1, 17, 33, 5, 80, 9, 64, 101, 12], [1, 40, 7], [1, 90, 91, 3, 55, 28]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoint):
    """family -> (directory, transformers model), saved on first use (tests/conftest.py)."""
    return hf_checkpoint


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=[EOS], pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "family", ["llama3.1", "llama3.2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
)
def test_greedy_equals_transformers(checkpoints, family):
    """Batched greedy generation equals transformers' generate on each prompt, token for token."""
    path, hf_model = checkpoints(family)
    actual = generate(
        from_pretrained(path), PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[EOS]
    )
    expected = [hf_greedy(hf_model, prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert actual == expected


def test_prefill_through_the_cache_equals_the_forward_pass(checkpoints):
    """extend() over a left-padded batch gives the logits of the packed training forward."""
    path, _ = checkpoints("gemma2")
    model = from_pretrained(path)
    tokens_BxT, positions_BxT = left_pad(PROMPTS[:2], batch=2, length=12, pad_id=0)
    cache = KVCache.empty(model.config, batch=2, length=20, dtype=jnp.float32)
    hidden_BxTxD, cache = model.extend(jnp.asarray(tokens_BxT), jnp.asarray(positions_BxT), cache)
    batch = {
        "input_ids": tokens_BxT,
        "positions": np.maximum(positions_BxT, 0),
        "segment_ids": (positions_BxT >= 0).astype(np.int32),
    }
    real = positions_BxT >= 0
    np.testing.assert_allclose(
        np.asarray(model.logits(hidden_BxTxD))[real], jax_logits(model, batch)[real], atol=1e-5
    )
    assert int(cache.index) == 12
    np.testing.assert_array_equal(np.asarray(cache.positions_BxS)[:, :12], positions_BxT)


def test_batched_equals_each_prompt_alone(checkpoints):
    path, _ = checkpoints("gemma3")
    model = from_pretrained(path)
    batched = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[EOS])
    alone = [
        generate(model, [p], max_new_tokens=NEW_TOKENS, stop_token_ids=[EOS])[0] for p in PROMPTS
    ]
    assert batched == alone


def test_sharded_model_generates_as_on_one_device(checkpoints):
    path, _ = checkpoints("qwen3")
    options = {"max_new_tokens": NEW_TOKENS, "stop_token_ids": [EOS]}
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = generate(from_pretrained(path, mesh=mesh), PROMPTS, **options)
    assert sharded == generate(from_pretrained(path), PROMPTS, **options)


def test_stop_tokens_end_each_row(checkpoints):
    """A row ends at (and includes) its first stop token; other rows go on."""
    path, _ = checkpoints("llama3.1")
    model = from_pretrained(path)
    free = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    stop = free[0][3]
    stopped = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[stop, EOS])
    for row, out in zip(free, stopped, strict=True):
        ends = [i for i, token in enumerate(row) if token in (stop, EOS)]
        assert out == (row[: ends[0] + 1] if ends else row)
    assert len(stopped[0]) <= 4 and stopped[0][-1] == stop
    assert generate(model, PROMPTS, max_new_tokens=5, stop_token_ids=[]) == [r[:5] for r in free]


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(checkpoints):
    path, _ = checkpoints("qwen2")
    model = from_pretrained(path)
    options = {"max_new_tokens": NEW_TOKENS, "stop_token_ids": [EOS], "temperature": 3.0}
    first = generate(model, PROMPTS, seed=1, **options)
    assert generate(model, PROMPTS, seed=1, **options) == first
    assert generate(model, PROMPTS, seed=2, **options) != first
    greedy = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[EOS])
    assert generate(model, PROMPTS, seed=1, **{**options, "top_p": 1e-6}) == greedy


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits_1xV = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))

    def kept(top_p: float) -> np.ndarray:
        return np.isfinite(np.asarray(nucleus(logits_1xV, jnp.float32(top_p))))[0]

    np.testing.assert_array_equal(kept(0.7), [False, True, False, True])
    np.testing.assert_array_equal(kept(0.81), [True, True, False, True])
    np.testing.assert_array_equal(kept(1e-6), [False, True, False, False])
    np.testing.assert_array_equal(kept(1.0), [True, True, True, True])


def test_second_call_in_the_same_buckets_does_not_recompile(checkpoints, monkeypatch):
    """Other prompt lengths, batch size, max_new_tokens, temperature and seed in the same
    buckets (batch 4, prompt 16, 32 new tokens) reuse the compiled loop."""
    path, _ = checkpoints("mistral")
    model = from_pretrained(path)
    traces = []
    extend = CausalLM.extend
    monkeypatch.setattr(CausalLM, "extend", lambda *a: traces.append(1) or extend(*a))
    generate(model, PROMPTS, max_new_tokens=20, stop_token_ids=[EOS], temperature=1.0)
    assert traces, "the first call must trace (prefill and loop body)"
    traced = len(traces)
    other_prompts = [[1, 2, 3] * 5, [4], [5, 6], [7]]
    generate(
        from_pretrained(path), other_prompts, max_new_tokens=31, stop_token_ids=[3, 9],
        temperature=0.5, top_p=0.9, seed=7,
    )  # fmt: skip
    assert len(traces) == traced


def randomize_adapters(model: CausalLM, seed: int = 1) -> None:
    """Trained-looking adapters: B != 0 (apply_lora starts it at 0)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, _, linear in decoder_linears(model):
        if linear.lora_b is not None:
            linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)


@pytest.mark.parametrize(
    "quantization", [None, QuantSpec("int8", block=32)], ids=["lora", "qlora_int8"]
)
def test_lora_generates_as_its_merged_export(checkpoints, quantization):
    path, _ = checkpoints("llama3.2")
    mesh = sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh, quantization=quantization)
    # A few targets keep apply_lora quick; quantization covers every kernel regardless.
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")), mesh)
    randomize_adapters(model)
    options = {"max_new_tokens": NEW_TOKENS, "stop_token_ids": [EOS]}
    with_adapters = generate(model, PROMPTS, **options)
    assert with_adapters == generate(merged(model), PROMPTS, **options)
    assert with_adapters != generate(from_pretrained(path), PROMPTS, **options)


# --- chat.py on a tiny word-level tokenizer with a chat template. ---

TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}t3 {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}t5 {% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(checkpoints, tmp_path_factory):
    path, _ = checkpoints("qwen3")
    # Special tokens must not prefix words: "t1" as BOS would split "t10" into "t1" "0".
    vocab = {f"t{i}": i for i in range(VOCAB)}
    for old, special in [("t1", "<s>"), ("t2", "</s>"), ("t4", "<|im_end|>")]:
        vocab[special] = vocab.pop(old)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_end|>"],
    )  # fmt: skip
    tokenizer.chat_template = TEMPLATE
    out = tmp_path_factory.mktemp("chat_model")
    shutil.copytree(path, out, dirs_exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def run_chat(capsys):
    """Runs chat.main in-process with these flags and returns what it printed."""

    def run(*argv: str) -> str:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["chat", *argv])
        chat.main([])
        return capsys.readouterr().out

    yield run
    flags.FLAGS.unparse_flags()


def expected_reply(model_dir, prompt_ids: list[int], stops: list[int]) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    new = generate(from_pretrained(model_dir), [prompt_ids], max_new_tokens=8, stop_token_ids=stops)
    new = new[0][:-1] if new[0] and new[0][-1] in stops else new[0]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_chat_stop_tokens_and_template(chat_model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_model_dir)
    assert chat_stop_token_ids(tokenizer, chat_model_dir) == [EOS, 4]  # eos, <|im_end|>
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "t10 t11"}])
    assert ids == [1, 3, 10, 11, 4, 5]


def test_chat_prompt_prints_the_reply(chat_model_dir, run_chat):
    out = run_chat(f"--model={chat_model_dir}", "--prompt=t10 t11", "--max_new_tokens=8")
    assert out == expected_reply(chat_model_dir, [1, 3, 10, 11, 4, 5], [EOS, 4]) + "\n"
    raw = run_chat(f"--model={chat_model_dir}", "--prompt=t10 t11", "--raw", "--max_new_tokens=8")
    assert raw == expected_reply(chat_model_dir, [10, 11], [EOS, 4]) + "\n"


def test_chat_reads_turns_from_stdin_and_keeps_history(chat_model_dir, run_chat, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("t10 t11\n\nt12\n"))
    first, second = run_chat(f"--model={chat_model_dir}", "--max_new_tokens=8").splitlines()
    assert first == expected_reply(chat_model_dir, [1, 3, 10, 11, 4, 5], [EOS, 4])
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_model_dir)
    history = [
        {"role": "user", "content": "t10 t11"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "t12"},
    ]
    second_prompt = chat_prompt_ids(tokenizer, history)
    assert second_prompt[-4:] == [3, 12, 4, 5] and len(second_prompt) > 9
    assert second == expected_reply(chat_model_dir, second_prompt, [EOS, 4])


def test_chat_with_a_run_exports_the_chosen_checkpoint(chat_model_dir, run_chat, monkeypatch):
    calls = []

    def fake_export_run(workdir, *, which, out):
        calls.append((workdir, which))
        return shutil.copytree(chat_model_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(chat.export, "export_run", fake_export_run)
    out = run_chat("--workdir=/runs/a", "--step=7", "--prompt=t10 t11", "--max_new_tokens=8")
    assert calls == [("/runs/a", 7)]
    assert out == expected_reply(chat_model_dir, [1, 3, 10, 11, 4, 5], [EOS, 4]) + "\n"
    run_chat("--workdir=/runs/a", "--prompt=t10", "--max_new_tokens=8")
    assert calls[-1] == ("/runs/a", "best")


def test_chat_without_a_model_or_run_is_one_clear_message(tmp_path, run_chat):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    for flag, message in (
        (f"--workdir={tmp_path / 'missing'}", "does not exist; give the WORKDIR of a run"),
        (f"--workdir={tmp_path / 'empty_run'}", "holds no complete checkpoint"),
        (f"--model={tmp_path / 'missing'}", "not a model directory"),
    ):
        with pytest.raises(SystemExit, match=message):
            run_chat(flag, "--prompt=hi")
