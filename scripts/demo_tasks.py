"""Two small tasks whose learning a user can see in a few dozen steps on a real model, written as
JSONL files a project imports (the main job, the real-model benchmark and tests use them):

- spell.jsonl (stage 1, a general skill): "Spell the word 'amber' with dashes." -> "A-M-B-E-R"
- dates.jsonl (stage 2, the domain): "Write 2019-07-14 as a date in words." -> "14 July 2019"

Both are exact: a model either learned the format or it did not, so base vs tuned shows in
exact-match accuracy and chrF on held-out rows, not only in loss. The words and dates are
deterministic; quality scores vary so quality weighting has something to weigh.

    python scripts/demo_tasks.py DEST_FOLDER
"""

from __future__ import annotations

import datetime
import json
import random
import sys
from pathlib import Path

WORDS = """amber anchor apple arrow autumn badge basket beacon berry blanket bottle bridge bucket butter
cabin cactus camera candle canyon carpet castle cedar cherry circle cloud clover cobalt copper cotton
crystal dagger desert dolphin dragon eagle echo ember engine falcon feather fiddle forest fossil garden
garlic ginger glacier globe granite hammer harbor harvest helmet hollow honey island ivory jacket jungle
kettle kitten ladder lantern lemon lizard magnet maple marble meadow mirror monkey mortar nectar needle
nickel oasis ocean olive orange orchid oyster paddle parrot pebble pepper pillow planet pocket quartz
rabbit ribbon river rocket saddle salmon silver spider spring summit tablet thunder timber tomato
tunnel turtle umber velvet violet wagon walnut willow window winter yonder zephyr""".split()

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def spell_rows() -> list[dict]:
    rng = random.Random(1)
    return [{"instruction": f"Spell the word '{word}' with dashes between its letters.",
             "output": "-".join(word.upper()), "quality": round(rng.uniform(0.55, 1.0), 2)} for word in WORDS]


def date_rows(n: int = 120) -> list[dict]:
    rng = random.Random(2)
    start = datetime.date(1950, 1, 1).toordinal()
    days = rng.sample(range(start, start + 365 * 80), n)
    rows = []
    for ordinal in days:
        day = datetime.date.fromordinal(ordinal)
        rows.append({"instruction": f"Write {day.isoformat()} as a date in words.",
                     "output": f"{day.day} {MONTHS[day.month - 1]} {day.year}",
                     "quality": round(rng.uniform(0.55, 1.0), 2)})
    return rows


def write(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in (("spell", spell_rows()), ("dates", date_rows())):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for name, path in write(Path(sys.argv[1])).items():
        print(f"{name}: {path} ({sum(1 for _ in path.open())} rows)")
