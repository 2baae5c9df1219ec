"""An offline word-level tokenizer for the tiny models, built with the ``tokenizers`` library.

Words split on ``\\w+|[^\\w\\s]+`` (the ``Whitespace`` pre-tokenizer), each word one token, a ``<bos>`` in
front of every encoded text. Wrapped as a ``PreTrainedTokenizerFast`` so it saves beside a model with
``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained`` (no network).
"""

from __future__ import annotations

from fastcd.errors import UsageError
from fastcd.tasks import EntityTracking, TheoryOfMind

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def task_vocabulary() -> list[str]:
    """Every word the built-in tasks can produce, sorted (so the ids are stable)."""

    words = EntityTracking().vocabulary() | TheoryOfMind().vocabulary()
    return sorted(words)


def build_word_tokenizer(words=None):
    """A ``PreTrainedTokenizerFast`` over ``words`` (default: the built-in tasks' vocabulary)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = task_vocabulary() if words is None else sorted(set(words))
    clash = set(words) & set(SPECIAL_TOKENS)
    if clash:
        raise UsageError(f"words must not include the special tokens {sorted(clash)}")
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        padding_side="right", model_max_length=512,
    )
