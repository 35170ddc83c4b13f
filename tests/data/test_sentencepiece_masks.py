"""The mask check on SentencePiece-style tokenizers, built as transformers builds them.

Llama 2, Mistral v0.3 and their fine-tunes decode with a Metaspace decoder (or a Strip of one
leading space) that drops the space of the first token decoded, so a reply ' 42 </s>' decoded
alone reads '42 </s>'. The check must compare what the trained tokens read as in their
document. Gemma's decoder strips nothing. The tokenizers here are transformers' own
LlamaTokenizer / GemmaTokenizer classes over a BPE vocabulary trained locally (byte fallback,
no download); the templates are the real ones (tests/data/templates/SOURCES.md).
"""

from __future__ import annotations

import json

import pytest
import tokenizers
import transformers
from chat_tokenizers import TEMPLATE_DIR, make_tokenizer
from test_chat_templates import trained_runs
from test_data import base_config

from sft_jax.core.spec import RunSpec
from sft_jax.data import DataError, certificate, load_datasets
from sft_jax.data import tokenize as tok
from sft_jax.data.formats import normalize
from sft_jax.data.records import Record

REPLY = "93 × 61 = 5673 ✔️"
CHATS = [
    {"messages": [{"role": "user", "content": "What is 93 times 61?"},
                  {"role": "assistant", "content": REPLY}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Hello there!"},
                  {"role": "assistant", "content": "Hi, how can I help?"},
                  {"role": "user", "content": "Reverse: a b c"},
                  {"role": "assistant", "content": "c b a"}]},
]  # fmt: skip
CORPUS = [m["content"] for c in CHATS for m in c["messages"]] + ["<<SYS>> [INST] model user"]

# family -> (transformers class, special tokens, bos, eos, real template file)
FAMILIES = {
    "mistral_v0_3": (transformers.LlamaTokenizer, ["[INST]", "[/INST]"], "<s>", "</s>",
                     "mistralai-Mistral-7B-Instruct-v0.3"),
    "llama2": (transformers.LlamaTokenizer, [], "<s>", "</s>", "meta-llama-Llama-2-7b-chat-hf"),
    "gemma": (transformers.GemmaTokenizer, ["<start_of_turn>", "<end_of_turn>"], "<bos>",
              "<eos>", "google-gemma-3-it"),
}  # fmt: skip


def sentencepiece_style(family: str) -> transformers.PreTrainedTokenizerBase:
    """transformers' own tokenizer class of `family` over a BPE trained on CORPUS."""
    cls, specials, bos, eos, template = FAMILIES[family]
    # Pieces start at a '▁' and never hold one inside, as SentencePiece's (it splits on
    # whitespace when it learns them); the tokenizer class then encodes as the family does.
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", bos, eos, *byte_tokens], show_progress=False
    )
    backend.train_from_iterator(CORPUS * 5, trainer)
    model = json.loads(backend.to_str())["model"]
    tokenizer = cls(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                    unk_token="<unk>", bos_token=bos, eos_token=eos)  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.pad_token = "<unk>"
    tokenizer.chat_template = (TEMPLATE_DIR / f"{template}.jinja").read_text(encoding="utf-8")
    return tokenizer


def options() -> tok.Options:
    return tok.Options("messages", "all_assistant", 4096, False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_mask_check_passes_replies_a_sentencepiece_decoder_strips(family):
    tokenizer = sentencepiece_style(family)
    strips = tokenizer.decode(tokenizer(" 42", add_special_tokens=False)["input_ids"]) == "42"
    assert strips == (family != "gemma")  # the decoders are as their families' are
    records = [Record(f"train.jsonl:{i + 1}", c) for i, c in enumerate(CHATS)]
    report = certificate.check_records(tokenizer, records, options())
    assert report["violations"] == [] and report["documents"] >= 2
    assert report["categories"]["assistant"]["trained"] > 0
    assert report["categories"]["user"]["trained"] == 0
    # What trains is each reply as rendered (the mask was never the problem).
    tokens, trained = tok.tokenize_documents(tokenizer, normalize(CHATS[0], "messages"),
                                             options())[0][0]  # fmt: skip
    assert tokenizer.unk_token_id not in tokens
    [run] = trained_runs(tokenizer, tokens, trained)
    assert REPLY in run and "93 times" not in run


def test_the_check_still_fails_trained_tokens_that_are_not_the_reply():
    """A reply word the vocabulary lacks is <unk>: it decodes to '<unk>', not to the reply."""
    tokenizer = make_tokenizer("chatml", corpus="Hi Hello")
    chat = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello zebra"}]}  # fmt: skip
    report = certificate.check_records(tokenizer, [Record("t.jsonl:3", chat)], options())
    [violation] = report["violations"]
    assert violation["where"] == "t.jsonl:3" and "<unk>" in violation["problem"]


def test_training_starts_on_a_llama_2_chat_tokenizer(tmp_path):
    """The start-up check of load_datasets (main.py and inspect) with a saved tokenizer."""
    sentencepiece_style("llama2").save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS * 3))
    config = base_config()
    config.data.tokenizer = str(tmp_path / "tokenizer")
    config.data.train_files = str(tmp_path / "train.jsonl")
    config.data.eval_files = ""
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.num_workers = 1
    try:
        loaded = load_datasets(RunSpec.of(config))
    except DataError as e:  # today's main: "the mask check failed at characters [...]"
        pytest.fail(f"a Llama 2 chat tokenizer is refused: {e}")
    assert len(loaded.train) == 6
