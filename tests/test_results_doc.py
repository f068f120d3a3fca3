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
    mantissa, _, exponent = t.partition("e")
    decimals = (len(mantissa.split(".")[1]) if "." in mantissa else 0) - int(exponent or 0)
    return float(t), decimals


def test_every_table_of_results_md_is_made_from_the_records():
    text, made = (DOCS / "results.md").read_text(), generated(_records())
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows, "no tables found"
    missing = [row for row in rows if row not in made]
    assert not missing, f"{len(missing)} table rows of docs/results.md are not what the records give, e.g. {missing[:2]}"


def _pool(values: list[float]) -> np.ndarray:
    v = np.array(values)
    return np.concatenate([v, 100 * v, v / 60, np.abs(v)])


def _found(pool: np.ndarray, x: float, decimals: int) -> bool:
    return bool(np.any(np.abs(np.round(pool, decimals) - abs(x)) < 10.0 ** -(decimals + 3)))


def test_every_number_in_results_md_is_in_the_records():
    """Counts may be any value of the records; a number with decimals must be one the tables show, a value of the
    study's configuration, facts and settings, or one every record holds alike (3-decimal scores are too many to
    match by chance in the raw records: a mistyped score is caught)."""
    saved = _records()
    everything, precise = [], []
    _values(saved, everything)
    _values(generated(saved), precise)
    _values({k: saved["study"][k] for k in ("config", "facts", "settings", "wall_seconds", "command")}, precise)
    _values(saved["byol_check"]["command"], precise)
    records = saved["study"]["records"]
    for key in {k for r in records for k in r}:  # what every record says alike is a fact of the protocol
        same = {json.dumps(r[key]) for r in records if key in r}
        if len(same) == 1:
            _values(json.loads(same.pop()), precise)
    everything += [len(saved["study"]["records"])]
    text = re.sub(r"```.*?```", "", (DOCS / "results.md").read_text(), flags=re.S)  # commands are records too
    unknown = []
    for token in NUMBER.findall(text):
        x, decimals = _number(token)
        if abs(x) in PROTOCOL:
            continue
        if not _found(_pool(precise if decimals > 0 else everything + precise), x, decimals):
            unknown.append(token)
    assert not unknown, f"numbers in docs/results.md that docs/results_records.json does not hold: {unknown}"
