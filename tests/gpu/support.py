"""A synthetic chat set a random-init model can learn: eight fixed question -> code pairs."""

from __future__ import annotations

from typing import Any

#: Question -> answer pairs; a random-init model can only answer them by having learned them.
CODES = {"red": "4417", "blue": "9021", "green": "3385", "amber": "7702",
         "violet": "1268", "silver": "5530", "coral": "6149", "indigo": "8893"}
QUESTION = "What is the code for {}?"
ANSWER = "The code for {} is {}."


def learnable_rows(n: int = 320) -> list[dict[str, Any]]:
    """``n`` ShareGPT rows cycling through :data:`CODES`."""
    colors = list(CODES)
    return [{"conversations": [{"from": "human", "value": QUESTION.format(c)},
                               {"from": "gpt", "value": ANSWER.format(c, CODES[c])}]}
            for c in (colors[i % len(colors)] for i in range(n))]
