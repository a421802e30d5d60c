"""Build a small byte-level BPE tokenizer offline (no hub), for the tiny and embedded default models.

Byte-level BPE encodes any string (Chinese, emoji, ...) without unknown tokens; digits are split one by one
so box coordinates such as ``(388,270)`` cost a fixed, learnable number of tokens.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from grounding.text.tokens import SPECIAL_TOKENS, add_special_tokens

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# How a vocabulary piece marks the start of a word: byte-level BPE (GPT-2, this project's) and SentencePiece
SPACE_MARKERS = ("Ġ", "▁")


def split_space_marker(piece: str) -> tuple[str, str]:
    """A vocabulary piece -> (its leading-space marker, or "", and the rest): "Ġleft" -> ("Ġ", "left")."""
    marker = piece[:1] if piece[:1] in SPACE_MARKERS else ""
    return marker, piece[len(marker):]

# Enough words for a tiny random model to produce varied text; real models train on their own corpus.
BASE_CORPUS = (
    "USER: ASSISTANT: where is the what is in this region describe segment find the please "
    "red green blue yellow orange purple pink cyan white black grey brown "
    "small medium large big tiny striped dotted checkered solid outlined "
    "circle square rectangle triangle star ellipse pentagon hexagon diamond cross ring shape object "
    "left right top bottom middle above below next to leftmost rightmost topmost second third largest smallest "
    "there is no such object here. It is . , ( ) 0 1 2 3 4 5 6 7 8 9 yes no a an of with and or"
).split()


def train_tokenizer(corpus: Iterable[str] = BASE_CORPUS, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a transformers tokenizer with the project's tokens."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left",
    )
    add_special_tokens(hf)
    assert all(len(hf.encode(t, add_special_tokens=False)) == 1 for t in SPECIAL_TOKENS)
    return hf
