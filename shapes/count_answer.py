"""A "How many ..." question gets its number in words: "There are 3 squares: <ref>squares</ref>...".

The default model answers "How many squares are there?" as it answers "Segment all the squares.": with one
target per object (``GroupCount`` makes it go on until the objects end) and no number, so a user has to count the
boxes. The ``count`` add-on, the last to review an answer, puts the number of its targets in front of it, named by
the question's own words. An answer without targets is left as it is (a denial already says "There are no ...").
"""
from __future__ import annotations

import re

# "how many <noun phrase>" up to the verb or the end of the question
_HOW_MANY = re.compile(r"\bhow\s+many\s+(?P<noun>[^?.!,;:]*?)\s*(?:\b(?:are|is|do|does|can|could|would|will|there|"
                       r"you|in|on|inside|of)\b|[?.!,;:]|$)", re.IGNORECASE)


def counted_noun(question: str) -> str | None:
    """The noun phrase a "How many" question counts ("How many red squares are there?" -> "red squares"; "" for
    "How many are there?"), or None for a question that is not one."""
    found = _HOW_MANY.search(question or "")
    return None if found is None else found.group("noun").strip()


def singular(noun: str) -> str:
    """The English singular of a noun phrase's last word ("red crosses" -> "red cross", "shapes" -> "shape")."""
    *head, last = noun.split() or [""]
    lower = last.lower()
    if lower.endswith(("sses", "xes", "shes", "ches")):
        last = last[:-2]
    elif lower.endswith("ies") and len(lower) > 4:
        last = last[:-3] + "y"
    elif lower.endswith("s") and not lower.endswith(("ss", "us", "is")):
        last = last[:-1]
    return " ".join(head + [last])


def count_sentence(question: str, targets: int) -> str | None:
    """"There are 3 squares: " for a "How many squares ..." question answered with 3 targets; None for another
    question or no target."""
    noun = counted_noun(question)
    if noun is None or targets < 1:
        return None
    noun = noun.lower() if noun.isupper() else noun   # "HOW MANY CROSSES?" is shouted, not a name
    if targets == 1:
        return f"There is 1 {singular(noun)}: " if noun else "There is 1: "
    return f"There are {targets} {noun}: " if noun else f"There are {targets}: "
