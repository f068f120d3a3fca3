"""House rules beyond the import layers: functions short enough to read, one training step (every benchmark times
the Trainer's), and a README whose layout names every module that exists and none that does not."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "engine", "kernels", "loaders")
MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(p for pkg in (*PACKAGES, "recipes", "api") for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], long


def _calls(path: Path) -> set[str]:
    """Names of the attributes and functions `path` calls."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            found.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return found


def test_benchmarks_time_the_trainers_step():
    """No benchmark steps an optimiser of its own: the training benchmarks and the GPU check call
    `Trainer.train_step`, the step a run takes (clipping, schedule and EMA included)."""
    own = {p.name: sorted(_calls(p) & {"zero_grad", "clip_grad_norm_", "AdamW", "SGD", "Adam"})
           for p in (ROOT / "bench").glob("*.py")}
    assert {name: calls for name, calls in own.items() if calls} == {}
    for name in ("train.py", "test_benchmarks.py", "gpu_check.py", "step_profile.py"):
        source = (ROOT / "bench" / name).read_text()
        assert "train_step(" in source or "stepper(" in source, f"bench/{name} does not run Trainer.train_step"
    for path in (ROOT / "bench").glob("*.py"):
        tree = ast.parse(path.read_text())
        steps = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr == "step" and not n.args]
        assert steps == [], f"bench/{path.name} calls .step() on something: train through Trainer.train_step"


def _layout() -> dict[str, set[str]]:
    """README's layout block: the files and folders it names under each top-level folder (words in parentheses are
    descriptions, not names)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    described: dict[str, str] = {}
    folder = None
    for line in block.splitlines():
        m = re.match(r"^(\w+)/\s+(.*)$", line)
        if m:
            folder, line = m.group(1), m.group(2)
        if folder:
            described[folder] = described.get(folder, "") + " " + line
    return {f: set(re.findall(r"\b(\w+(?:\.py|\.json|/))(?!\w)", re.sub(r"\([^)]*\)", "", text)))
            for f, text in described.items()}


def test_readme_layout_names_every_module_and_only_real_ones():
    named = _layout()
    for folder in PACKAGES:
        real = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        real |= {p.name + "/" for p in (ROOT / folder).iterdir() if p.is_dir() and p.name != "__pycache__"}
        real |= {p.name for p in (ROOT / folder).glob("*.json")}
        listed = {n for n in named.get(folder, set()) if not n.startswith("_")}
        assert listed - real == set(), f"README names {sorted(listed - real)} in {folder}/, which do not exist"
        missing = {n for n in real - listed if not n.startswith("_")}
        assert missing == set(), f"README's layout does not name {sorted(missing)} of {folder}/"
