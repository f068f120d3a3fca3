"""README's Python snippets run as written (on a small synthetic store standing in for `atlas.cellstore`, with
batches it can fill) and say what they hold."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_snippets_run(synthetic_store):
    blocks = snippets()
    assert len(blocks) >= 2
    for block in blocks:
        code = block.replace('"atlas.cellstore"', repr(str(synthetic_store))).replace("batch_size=8192",
                                                                                      "batch_size=64")
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
