"""Special tokens of the grounding vocabulary and how they get into a tokenizer.

The answer grammar (see ``grounding.text.boxes``) is written with these strings; each must be
one token id so that the model can emit it in one step and [SEG] positions can be found by id.
"""
from __future__ import annotations

IMAGE = "<image>"
SEG = "[SEG]"
REF_START = "<ref>"
REF_END = "</ref>"
BOX_START = "<box>"
BOX_END = "</box>"
POINT_START = "<point>"
POINT_END = "</point>"

SPECIAL_TOKENS: tuple[str, ...] = (
    IMAGE, SEG, REF_START, REF_END, BOX_START, BOX_END, POINT_START, POINT_END,
)


def add_special_tokens(tokenizer) -> dict[str, int]:
    """Register every token of ``SPECIAL_TOKENS`` on a ``transformers`` tokenizer.

    Tokens are added as *extra special* tokens: never split by the pre-tokenizer, not
    normalised, no whitespace stripping, and returned verbatim by
    ``decode(..., skip_special_tokens=False)``. A token the tokenizer already knows keeps
    its id. Returns ``{token: id}``. The caller must resize the model's embeddings to
    ``len(tokenizer)`` afterwards.
    """
    # Imported here so that parsing code can import this module without transformers.
    from tokenizers import AddedToken

    known = {str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or ()}
    missing = [
        AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
        for t in SPECIAL_TOKENS
        if t not in known
    ]
    if missing:
        # replace_... = False: keep the tokenizer's own extra special tokens (e.g. <image>
        # of a LLaVA processor) instead of overwriting that list with ours.
        tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
