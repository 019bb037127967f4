"""`capped`: the start of a text that its first tokens come from, so that a huge row costs what a normal one does.

A run keeps a row's first `max_length` tokens; tokenising the whole of a 46 MB line to find them
takes minutes and gigabytes. `capped` hands the tokenizer at most `CHARS_PER_TOKEN` characters per
token kept (and two more, to see the truncation), cut back to the last whitespace so that no word
is split. Tokenizers split words at whitespace, so those tokens begin the whole text's tokens; if
they are too few (long runs of spaces, or of characters a tokenizer drops), it takes twice as many
characters, up to the whole text. A text without whitespace in the window is cut where the window ends.

>>> from layerfuse import load_model
>>> _, tokenizer = load_model()
>>> text = "a rather long row " * 10_000
>>> short = capped(tokenizer, text, max_length=8)
>>> len(text), len(short)
(180000, 157)
>>> tokenizer(short, truncation=True, max_length=8)["input_ids"] == tokenizer(text, truncation=True, max_length=8)["input_ids"]
True
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

CHARS_PER_TOKEN = 16
_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")


def capped(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> str:
    """The start of `text` whose first `max_length` tokens, and whether there are more, are those of `text`."""
    limit = CHARS_PER_TOKEN * (max_length + 2)
    while limit < len(text):
        cut = text[:limit]
        space = _LAST_SPACE.search(cut)
        if space is not None and space.start() > 0:
            cut = cut[: space.start()]
        if len(tokenizer(cut, verbose=False)["input_ids"]) > max_length + 1:
            return cut
        limit *= 2
    return text
