"""Shared offline fixtures for the framework-adapter tests.

Everything is built in code: a word-level tokenizer, a two-layer Llama causal LM of a
few thousand parameters, and small preference datasets. Nothing is downloaded.

Fixtures (all named ``tiny_*``):

* ``tiny_tokenizer``: a ``PreTrainedTokenizerFast`` with ``<pad>``, ``<s>``, ``</s>``
  and ``<unk>`` special tokens.
* ``tiny_model_factory``: ``tiny_model_factory(seed=0)`` returns a fresh
  ``LlamaForCausalLM`` whose weights depend only on ``seed``: the one tiny model of
  the tests and the examples, :func:`otloss.integrations._common.tiny_causal_lm`.
* ``tiny_model``: ``tiny_model_factory(0)``.
* ``tiny_model_dir``: a directory (one per session) holding ``tiny_model_factory(0)``
  and the tokenizer, loadable with ``from_pretrained``.
* ``tiny_preference_rows``: paired rows ``{"prompt", "chosen", "rejected"}``.
* ``tiny_unpaired_rows``: unpaired (KTO-format) rows ``{"prompt", "completion", "label"}``
  with more desirable than undesirable examples.

The datasets are plain lists of dicts so that adapters without ``datasets`` can use
them; wrap them with ``datasets.Dataset.from_list`` where needed.
"""

from __future__ import annotations

import random

import pytest

TINY_WORDS = tuple(
    (
        "the a cat dog bird fish sat ran flew swam on under over in mat log tree pond "
        "is was good bad happy sad big small red blue green yes no please thanks why how what"
    ).split()
)
TINY_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
TINY_VOCAB_SIZE = 64  # >= len(TINY_SPECIAL) + len(TINY_WORDS)


def _build_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL + TINY_WORDS)}
    if len(vocab) > TINY_VOCAB_SIZE:
        raise RuntimeError("the tiny vocabulary outgrew TINY_VOCAB_SIZE")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    # A minimal chat template, for code paths that render conversations.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    return tok


def _build_model(seed: int):
    pytest.importorskip("transformers")
    from otloss.integrations._common import tiny_causal_lm

    model = tiny_causal_lm(seed, vocab_size=TINY_VOCAB_SIZE)
    model.eval()
    return model


@pytest.fixture
def tiny_tokenizer():
    """A word-level fast tokenizer over a 40-word vocabulary, built in code."""
    return _build_tokenizer()


@pytest.fixture
def tiny_model_factory():
    """Callable ``(seed=0) -> LlamaForCausalLM``: the same seed gives the same weights."""

    def make(seed: int = 0):
        return _build_model(seed)

    return make


@pytest.fixture
def tiny_model(tiny_model_factory):
    """A fresh tiny ``LlamaForCausalLM`` (seed 0)."""
    return tiny_model_factory(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding the seed-0 tiny model and the tokenizer (``from_pretrained`` works offline)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    _build_model(0).save_pretrained(path)
    _build_tokenizer().save_pretrained(path)
    return path


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n))


@pytest.fixture
def tiny_preference_rows():
    """16 paired rows ``{"prompt", "chosen", "rejected"}`` (plain strings)."""
    rng = random.Random(0)
    return [
        {
            "prompt": _sentence(rng, rng.randint(2, 4)),
            "chosen": " " + _sentence(rng, rng.randint(2, 5)),
            "rejected": " " + _sentence(rng, rng.randint(2, 5)),
        }
        for _ in range(16)
    ]


@pytest.fixture
def tiny_unpaired_rows():
    """20 unpaired KTO-format rows ``{"prompt", "completion", "label"}``: 13 desirable, 7 undesirable."""
    rng = random.Random(1)
    labels = [True] * 13 + [False] * 7
    rng.shuffle(labels)
    return [
        {
            "prompt": _sentence(rng, rng.randint(2, 4)),
            "completion": " " + _sentence(rng, rng.randint(2, 5)),
            "label": label,
        }
        for label in labels
    ]
