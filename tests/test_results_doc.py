"""docs/results.md says only what its records hold: every table is the one the study's code makes from
docs/results_records.json, and every number in the text is a value of the records (or a mean, interval, percentage
or count the tables derive from them) at the precision shown."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from cellssl.engine.evaluate.byol_check import table as byol_table
from cellssl.engine.evaluate.study_stats import summary

DOCS = Path(__file__).resolve().parents[1] / "docs"
NUMBER = re.compile(r"(?<![\w.])[−+-]?\d[\d,]*(?:\.\d+)?(?:e[−-]?\d+)?")
# numbers of the protocol's statistics, not of the records: confidence levels of the intervals and the test level
PROTOCOL = {95.0, 90.0, 0.05}


def _records() -> dict:
    return json.loads((DOCS / "results_records.json").read_text())


def byol_records(saved: dict) -> list[dict]:
    """The BYOL table's rows: the study's BYOL arms fine-tuned on the whole train split (the reference's learning
    rate, both target networks), then the check's other learning rates."""
    study = saved["study"]
    lr = {m: study["settings"][m]["lr"] for m in ("byol", "byol_frozen")}
    rows = [{**r, "target": "ema" if r["method"] == "byol" else "frozen", "lr": lr[r["method"]]}
            for r in study["records"] if r["method"] in lr and r["share"] == 1]
    return rows + saved["byol_check"]["records"]


def generated(saved: dict) -> str:
    study = saved["study"]
    return summary(study["records"], study["config"]["margin"]) + byol_table(byol_records(saved))


def _values(node, out: list[float]) -> None:
    if isinstance(node, bool) or node is None:
        return
    if isinstance(node, (int, float)):
        out.append(float(node))
    elif isinstance(node, str):
        out.extend(_number(t)[0] for t in NUMBER.findall(node))
    elif isinstance(node, dict):
        for v in node.values():
            _values(v, out)
    elif isinstance(node, list):
        for v in node:
            _values(v, out)


def _number(token: str) -> tuple[float, int]:
    """(value, decimals shown)."""
    t = token.replace("−", "-").replace(",", "").lstrip("+")
    decimals = len(t.split(".")[1].split("e")[0]) if "." in t else 0
    return float(t), decimals


def test_every_table_of_results_md_is_made_from_the_records():
    text, made = (DOCS / "results.md").read_text(), generated(_records())
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows, "no tables found"
    missing = [row for row in rows if row not in made]
    assert not missing, f"{len(missing)} table rows of docs/results.md are not what the records give, e.g. {missing[:2]}"


def test_every_number_in_results_md_is_in_the_records():
    saved = _records()
    values: list[float] = []
    _values(saved, values)
    _values(generated(saved), values)
    v = np.array(values)
    known = np.concatenate([v, 100 * v, v / 60, np.abs(v), [len(saved["study"]["records"])]])
    text = re.sub(r"```.*?```", "", (DOCS / "results.md").read_text(), flags=re.S)  # commands are records too
    unknown = []
    for token in NUMBER.findall(text):
        x, decimals = _number(token)
        if x in PROTOCOL or abs(x) in PROTOCOL:
            continue
        if not np.any(np.abs(np.round(known, decimals) - x) < 10 ** -(decimals + 3)) and not np.any(
                np.abs(np.round(known, decimals) + x) < 10 ** -(decimals + 3)):
            unknown.append(token)
    assert not unknown, f"numbers in docs/results.md that docs/results_records.json does not hold: {unknown}"
