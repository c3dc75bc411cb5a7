"""The built-in demo task: rewrite a date written in any common style as ISO 8601 (YYYY-MM-DD).

The data is generated here, seeded, so the demo needs no download. Out of the box SmolLM2-135M-Instruct
knows roughly what ISO 8601 is but answers with extra words, mixes up day and month, or repeats the
year, so its exact-match score is near zero; a few hundred LoRA steps on this data teach it the format.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
_ORDINAL = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}


def _styles(d: dt.date) -> list[str]:
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    nth = f"{d.day}{_ORDINAL.get(d.day, 'th')}"
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{short} {d.day} {d.year}",
        f"the {nth} of {month}, {d.year}",
        f"{month} {nth}, {d.year}",
        f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",
        f"{d.month}/{d.day}/{d.year} (US style)",
        f"{d.day}.{d.month}.{d.year}",
    ]


def demo_example(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Return one chat example (OpenAI messages format) of the date-normalisation task."""
    date = dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(0, 200 * 365))
    style = rng.choice(_styles(date))
    return {"messages": [
        {"role": "user", "content": f"Write this date in ISO 8601 format: {style}"},
        {"role": "assistant", "content": date.isoformat()},
    ]}


def write_demo_data(folder: Path, n_train: int = 320, n_eval: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write ``demo_train.jsonl`` and ``demo_eval.jsonl`` (disjoint, seeded) into ``folder``; return both paths."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[dict[str, list[dict[str, str]]]] = []
    while len(rows) < n_train + n_eval:
        ex = demo_example(rng)
        key = ex["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    paths = folder / "demo_train.jsonl", folder / "demo_eval.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:]), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths
