"""Render pytest-benchmark JSON into the markdown tables of bench/README.md, one table per benchmark group.

Each row: what ran, its role (ours, baseline, peer, ceiling), cells/s (the cells of one round ÷ its median time,
or the cells/s a subprocess peer measured itself), and the ratio to the group's reference row (the eager or
paper-style baseline, annbatch among loaders, scipy for resident shards, one worker for conversion). Training
rows of ours add the matmul ceiling and the share of it reached; resident rows the time to read the data in.
Usage: python bench/render.py bench/results.json
"""
from __future__ import annotations

import codecs
import json
import sys
from collections import defaultdict


def cells_per_s(bench: dict) -> float:
    info = bench["extra_info"]
    return info.get("cells_per_s") or info["cells"] / bench["stats"]["median"]


def render(report: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in report["benchmarks"]:
        groups[bench["group"] or bench["name"]].append(bench)
    machine = report.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} "
             f"cores, Python {machine.get('python_version', '?')}; {report.get('datetime', '')}", ""]
    for group, benches in groups.items():
        reference = next((b for b in benches if b["extra_info"].get("reference")), None)
        ref = cells_per_s(reference) if reference else None
        training = any("ceiling_cells_per_s" in b["extra_info"] for b in benches)
        loads = any("load_s" in b["extra_info"] for b in benches)
        lines += [f"**{group}**", "", "| run | role | cells/s | ÷ reference |" + (" ceiling cells/s | of ceiling |"
                                                                           if training else "")
                  + (" load s |" if loads else ""),
                  "|---|---|---:|---:|" + ("---:|---:|" if training else "") + ("---:|" if loads else "")]
        for b in benches:
            speed = cells_per_s(b)
            label = codecs.decode(b["extra_info"].get("label", b["name"]), "unicode_escape")  # pytest escapes ids
            row = f"| {label} | {b['extra_info']['role']} | {speed:,.0f} | " + (f"{speed / ref:.2f}× |" if ref else "– |")
            if training:
                ceiling = b["extra_info"].get("ceiling_cells_per_s")
                row += f" {ceiling:,.0f} | {speed / ceiling:.0%} |" if ceiling else " | |"
            if loads:
                row += f" {b['extra_info'].get('load_s', 0):.1f} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[-1])
    with open(sys.argv[1]) as fh:
        print(render(json.load(fh)))
