"""Tokenization stats of parts of the data, added up as the parts are tokenized."""

from __future__ import annotations

from typing import Any


def add(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Adds the stats of a later part of the data to `total`: counts add, "first_" places keep
    the earliest, drop reasons add per reason (in sorted order)."""
    for key, value in part.items():
        if key == "dropped":
            for reason, count in value.items():
                total[key][reason] = total[key].get(reason, 0) + count
            total[key] = dict(sorted(total[key].items()))
        elif key.startswith("first_"):  # where the first one was read
            total[key] = total[key] or value
        else:
            total[key] += value
