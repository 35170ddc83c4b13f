"""lm-eval model type "sft_jax" against lm-eval's own `hf` backend on the same export: every
request's log-likelihood (rel 1e-4) and is_greedy, greedy generations and the metrics of a
multiple-choice, a generation (regex filter) and a rolling-perplexity task; batched equals
one request at a time; the CLI; what is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_generate import randomize_adapters
from test_trainer import base_config
from tiny_tasks import MAX_LENGTH, TASKS, save_model, write_tasks

from sft_jax.adapters.lora import LoRASpec, apply_lora, merged
from sft_jax.core.errors import UsageError
from sft_jax.core.spec import RunSpec
from sft_jax.data import open_data
from sft_jax.evaluation.generate import sampling_options
from sft_jax.evaluation.harness import SftJaxLM
from sft_jax.evaluation.tasks import metric_key
from sft_jax.loop import export, trainer
from sft_jax.models import from_pretrained, save_pretrained
from sft_jax.train import sharding
from sft_jax.workdir.metric_names import documented

NUMBERS = " ".join(str(n) for n in range(100, 160))  # 119 tokens: windows, truncation
LOGLIKELIHOOD = [
    ("What is 3 + 4 ? Answer :", " 7"),
    ("What is 3 + 4 ? Answer : ", "12"),  # the trailing space moves to the continuation
    ("", "Hello ! How are you ?"),  # scored after BOS
    (NUMBERS, " 7 8 9"),  # longer than the context: left-truncated
]
ROLLING = ["Fine thanks", "What is 12 + 30 ? 42 .", NUMBERS]
GENERATE = [
    ("What is 3 + 4 ? Answer :", {"until": ["?"], "max_gen_toks": 6, "do_sample": False}),
    ("Hello ! How are you", {"until": ["!", "\n\n"], "max_gen_toks": 9}),
    (NUMBERS, {"until": ["?"], "max_gen_toks": 6, "do_sample": False}),
    ("Sort these letters", {"until": ["?"], "max_gen_toks": 6, "do_sample": False}),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    (root / "model").mkdir()
    (root / "tasks").mkdir()
    save_model(root / "model")
    write_tasks(root / "tasks")
    return root


@pytest.fixture(scope="module")
def lms(files):
    """(lm-eval's hf, ours with 4 rows a batch, ours one at a time) on the same export."""
    model = str(files / "model")
    hf = HFLM(pretrained=model, batch_size=4, device="cpu", dtype="float32")
    return hf, SftJaxLM(model, batch_size=4), SftJaxLM(model, batch_size=1)


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def greedy_ids(hf: HFLM, context: list[int], count: int) -> list[int]:
    """transformers' argmax continuation of `context` (count tokens)."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(count):
            logits = hf.model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(context) :]


def test_registered_with_lm_eval(files):
    """lm-eval builds it by name from a model_args string, as `--model sft_jax` does."""
    assert get_model("sft_jax") is SftJaxLM
    lm = get_model("sft_jax").create_from_arg_string(
        f"model={files / 'model'},batch_size=3,max_gen_toks=7", {"batch_size": None}
    )
    assert (lm.batch_size, lm.max_gen_toks, lm.max_length) == (3, 7, MAX_LENGTH)


def test_requests_equal_hf_and_batched_equals_alone(lms):
    hf, ours, alone = lms
    expected = hf.loglikelihood(instances("loglikelihood", LOGLIKELIHOOD))
    context = hf.tok_encode("What is 3 + 4 ? Answer :")
    greedy = greedy_ids(hf, context, 4)
    token_requests = [(None, context, greedy), (None, context, [*greedy[:-1], greedy[-1] + 1])]
    expected += hf._loglikelihood_tokens(token_requests)
    rolling = hf.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in ROLLING]))
    generated = hf.generate_until(instances("generate_until", GENERATE))
    assert [g for _, g in expected[-2:]] == [True, False]
    got = ours.loglikelihood(instances("loglikelihood", LOGLIKELIHOOD))
    got += ours._loglikelihood_tokens(token_requests)
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in expected], rtol=1e-4)
    assert [g for _, g in got] == [g for _, g in expected]
    got_rolling = ours.loglikelihood_rolling(
        instances("loglikelihood_rolling", [(t,) for t in ROLLING])
    )
    np.testing.assert_allclose(got_rolling, rolling, rtol=1e-4)
    assert ours.generate_until(instances("generate_until", GENERATE)) == generated
    # One request at a time: other batches, other buckets, the same figures.
    one_by_one = alone.loglikelihood(instances("loglikelihood", LOGLIKELIHOOD))
    np.testing.assert_allclose(one_by_one, got[: len(LOGLIKELIHOOD)], rtol=1e-6)
    assert alone.generate_until(instances("generate_until", GENERATE[:2])) == generated[:2]


def test_a_mixture_of_experts_equals_hf(tmp_path):
    """A Mixtral export: every request's log-likelihood, rolling log-likelihood and greedy
    generation as lm-eval's hf backend gives them."""
    save_model(tmp_path, seed=1, experts=4)
    hf = HFLM(pretrained=str(tmp_path), batch_size=4, device="cpu", dtype="float32")
    ours = SftJaxLM(str(tmp_path), batch_size=4)
    requests = instances("loglikelihood", LOGLIKELIHOOD)
    expected, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in expected], rtol=1e-4)
    assert [g for _, g in got] == [g for _, g in expected]
    rolling = instances("loglikelihood_rolling", [(t,) for t in ROLLING])
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling), rtol=1e-4
    )
    generate = instances("generate_until", GENERATE[:2])
    assert ours.generate_until(generate) == hf.generate_until(generate)


def _run(lm, files, **options):
    manager = TaskManager(include_path=str(files / "tasks"), include_defaults=False)
    return simple_evaluate(
        model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True,
        bootstrap_iters=0, **options,
    )  # fmt: skip


def assert_same_value(ours, reference) -> None:
    """Equal, floats to rel 1e-4, through lists, tuples and dicts."""
    if isinstance(reference, float):
        np.testing.assert_allclose(ours, reference, rtol=1e-4)
    elif isinstance(reference, (list, tuple)):
        assert len(ours) == len(reference)
        for a, b in zip(ours, reference, strict=True):
            assert_same_value(a, b)
    elif isinstance(reference, dict):
        assert ours.keys() == reference.keys()
        for key in reference:
            assert_same_value(ours[key], reference[key])
    else:
        assert ours == reference


def test_tasks_equal_hf(lms, files):
    hf, ours, _ = lms
    expected, got = _run(hf, files), _run(ours, files)
    for task in TASKS:
        metrics = {k: v for k, v in expected["results"][task].items() if "stderr" not in k}
        assert_same_value({k: got["results"][task][k] for k in metrics}, metrics)
        for mine, theirs in zip(got["samples"][task], expected["samples"][task], strict=True):
            for field in ("arguments", "resps", "filtered_resps", *metrics):
                if field in theirs:
                    assert_same_value(mine[field], theirs[field])
    answers = [s["filtered_resps"] for s in got["samples"]["tiny_gen"]]
    assert all(a[0].isdigit() for a in answers)  # the regex filter kept a number of each
    assert {"acc,none", "word_perplexity,none"} <= {
        *got["results"]["tiny_mc"],
        *got["results"]["tiny_ppl"],
    }


def test_chat_template_equals_hf(lms):
    hf, ours, _ = lms
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for prompt in (True, False):
        assert ours.apply_chat_template(history, prompt) == hf.apply_chat_template(history, prompt)
    assert ours.chat_template(True) == hf.chat_template(True)


def test_cli_writes_lm_eval_results(files, lms, tmp_path):
    hf, _, _ = lms
    command = [
        sys.executable, "-m", "sft_jax.evaluate", f"--model={files / 'model'}",
        "--tasks=tiny_mc", f"--include_path={files / 'tasks'}", "--nobuiltin_tasks",
        "--limit=3", "--batch_size=2", f"--output_path={tmp_path}", "--log_samples",
        "--bootstrap_iters=0",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_mc" in result.stdout and "acc" in result.stdout
    written = json.loads((tmp_path / "results.json").read_text())["results"]["tiny_mc"]
    expected = _run(hf, files, limit=3)["results"]["tiny_mc"]
    assert written["acc,none"] == expected["acc,none"]
    samples = (tmp_path / "samples_tiny_mc.jsonl").read_text().splitlines()
    assert len(samples) == 3


def test_cli_evaluates_a_lora_run_as_it_trained(lms, files, tmp_path):
    """--workdir: the run's LoRA model, unmerged, holding its checkpoint's parameters, scores
    every request as lm-eval's hf backend does on the run's merged export."""
    rows = [
        {"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                      {"role": "assistant", "content": f"Answer {2 * a + 1}"}]}
        for a in range(8)
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config(files / "model", steps=2, learning_rate=5e-2)
    config.data.train_files = config.data.eval_files = str(tmp_path / "chat.jsonl")
    config.data.max_length, config.data.cache_dir = 32, "none"
    config.eval.generate_examples = config.eval.show_samples = 0
    config.lora.rank, config.checkpoint.enabled, config.checkpoint.async_save = 4, True, False
    trainer.run(RunSpec.of(config), tmp_path / "run", data_factory=lambda c, feed: open_data(c))
    command = [
        sys.executable, "-m", "sft_jax.evaluate", f"--workdir={tmp_path / 'run'}", "--which=last",
        "--tasks=tiny_mc", f"--include_path={files / 'tasks'}", "--nobuiltin_tasks",
        "--batch_size=2", f"--output_path={tmp_path / 'out'}", "--log_samples",
        "--bootstrap_iters=0",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = str(export.export_run(tmp_path / "run", which="last"))
    hf = HFLM(pretrained=exported, batch_size=4, device="cpu", dtype="float32")
    scores = {  # per document, each choice's log-likelihood
        name: {r["doc_id"]: [float(x[0][0]) for x in r["resps"]] for r in rows}
        for name, rows in (
            ("hf", _run(hf, files)["samples"]["tiny_mc"]),
            ("base", _run(lms[0], files)["samples"]["tiny_mc"]),
            ("ours", map(json.loads, (tmp_path / "out" / "samples_tiny_mc.jsonl").open())),
        )
    }
    assert scores["ours"].keys() == scores["hf"].keys()
    for doc, ours in scores["ours"].items():
        np.testing.assert_allclose(ours, scores["hf"][doc], rtol=1e-4)
    assert not np.allclose(
        [x for d in sorted(scores["ours"]) for x in scores["ours"][d]],
        [x for d in sorted(scores["base"]) for x in scores["base"][d]],
        rtol=1e-3,
    )  # the run's adapters changed the scores


def test_live_lora_model_on_a_mesh_equals_hf_on_its_merged_export(lms, files, tmp_path):
    """What config.eval.harness_tasks scores: the training model as it is (sharded over fsdp x
    tensor, LoRA unmerged) gives the log-likelihoods lm-eval's hf backend gives on its merged
    export."""
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model = from_pretrained(files / "model", mesh=mesh)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")), mesh)
    randomize_adapters(model)
    save_pretrained(merged(model), tmp_path, tokenizer=lms[1].tokenizer)
    hf = HFLM(pretrained=str(tmp_path), batch_size=4, device="cpu", dtype="float32")
    requests = instances("loglikelihood", LOGLIKELIHOOD)
    live = SftJaxLM(model, lms[1].tokenizer, batch_size=4).loglikelihood(requests)
    expected = hf.loglikelihood(requests)
    np.testing.assert_allclose([x for x, _ in live], [x for x, _ in expected], rtol=1e-4)
    assert [g for _, g in live] == [g for _, g in expected]
    assert not np.allclose(
        [x for x, _ in live], [x for x, _ in lms[0].loglikelihood(requests)], rtol=1e-3
    )  # the adapters change the scores


def test_trainer_eval_writes_harness_metrics(lms, files, tmp_path):
    """A run's eval with eval.harness_tasks: harness/<task>/<metric> in its metrics (and in
    metrics.jsonl, whose writer refuses undocumented keys in the tests), equal to hf's."""
    rows = [
        {"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                      {"role": "assistant", "content": f"Answer {2 * a + 1}"}]}
        for a in range(8)
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config(files / "model")
    config.data.train_files = config.data.eval_files = str(tmp_path / "chat.jsonl")
    config.data.max_length, config.data.cache_dir = 32, "none"
    config.eval.generate_examples = config.eval.show_samples = 0
    config.eval.harness_tasks, config.eval.harness_limit = "tiny_mc", 2
    config.eval.harness_include_path = str(files / "tasks")
    spec = RunSpec.of(config)
    run = trainer.Trainer(spec, tmp_path, from_pretrained(files / "model"), open_data(spec))
    metrics = run.run_eval(0)
    expected = simple_evaluate(
        model=lms[0], tasks=["tiny_mc"], limit=2, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(files / "tasks"), include_defaults=False),
    )["results"]["tiny_mc"]  # fmt: skip
    harness = {k: v for k, v in metrics.items() if k.startswith("harness/")}
    assert harness == {
        "harness/tiny_mc/acc": expected["acc,none"],
        "harness/tiny_mc/acc_norm": expected["acc_norm,none"],
    }
    assert all(documented(key) for key in harness)
    assert (
        metric_key("gsm8k", "exact_match,strict-match") == "harness/gsm8k/exact_match_strict-match"
    )
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["harness/tiny_mc/acc"] == metrics["harness/tiny_mc/acc"]


def test_refusals(files, tmp_path):
    with pytest.raises(UsageError, match="repetition_penalty"):
        sampling_options({"until": [], "repetition_penalty": 1.2}, 16)
    with pytest.raises(UsageError, match="batch_size"):
        SftJaxLM(str(files / "model"), batch_size=0)
    with pytest.raises(UsageError, match="max_new_tokens"):
        SftJaxLM(str(files / "model"), max_new_tokens=8)
    export = tmp_path / "export"
    shutil.copytree(files / "model", export)
    (export / "adapter").mkdir()
    (export / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    lm = SftJaxLM(str(export))  # LoRA: merged into the export, nothing to load
    assert (lm.max_length, lm.virtual_ids, lm.model.kv_prefix) == (MAX_LENGTH, [], None)
