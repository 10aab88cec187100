"""Locally trained tokenizers for the built-in tiny models (no download), and token lookups.

:func:`build_tokenizer` trains a word-level or BPE tokenizer with the ``tokenizers`` library on
a benchmark's text and wraps it in ``PreTrainedTokenizerFast`` with the special tokens the
adapters and the tiny models use (``<pad>`` id 0, ``<s>``, ``</s>``, ``<unk>``, ``<image>``).
"""

from __future__ import annotations

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)
# Words of the prompt templates, always put into the vocabulary of a locally built tokenizer.
TEMPLATE_TEXT = "USER: ASSISTANT: system user assistant"

IGNORE_INDEX = -100


def build_tokenizer(
    texts: list[str], vocab_size: int = 4096, kind: str = "word", min_frequency: int = 1
):
    """Train a small tokenizer on ``texts`` with the ``tokenizers`` library (no download).

    ``kind="word"``: one token per lowercased word / punctuation mark (words beyond
    ``vocab_size`` become ``<unk>``); ``kind="bpe"``: byte-pair merges on the same pre-tokens.
    Normalisation: NFKC, lowercase, whitespace runs collapsed, stripped. Pre-tokenization:
    whitespace (``Metaspace``: a word carries its leading space as ``▁``) then punctuation, so
    ``decode`` restores the normalised text exactly. Special tokens: ``<pad>`` (id 0), ``<s>``,
    ``</s>``, ``<unk>``, ``<image>`` (``tokenizer.image_token``); the template words of the
    adapters are always in the vocabulary.

    Returns a ``transformers.PreTrainedTokenizerFast`` (saveable with ``save_pretrained``,
    reloadable with ``AutoTokenizer.from_pretrained``), right padding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS)
    if kind == "word":
        tk = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials
        )
    elif kind == "bpe":
        tk = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials
        )
    else:
        raise ValueError(f"kind must be 'word' or 'bpe', got {kind!r}")
    tk.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(),
        ]
    )
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.train_from_iterator([TEMPLATE_TEXT, *texts], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # (a named special token: tokenizer.image_token; a bare image_token= sets none on 4.x)
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )
    return tok


def token_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` if the tokenizer has it as a single token, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "SPECIAL_TOKENS", "build_tokenizer"]
