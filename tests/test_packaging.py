"""The distribution installs one namespace, cellssl.*, from a wheel as from an editable install; every Triton kernel
compiles for real GPUs (ahead of time, for CUDA targets; no GPU needed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_the_cellssl_namespace(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "runs", "data", "__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("cellssl-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the wheel's own files only: unpack it, and reach the dependencies (not this checkout, not the editable
    # finder: paths listed in a .pth file have their own .pth files ignored) through the test environment
    subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), str(site)], check=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = ("import cellssl.loaders, cellssl.kernels, cellssl.engine.cli, cellssl.engine.evaluate.suite\n"
             "from cellssl.loaders import BatchStream\n"
             "from cellssl.loaders.genes import GeneSpace\n"
             "from cellssl.loaders.genesets import read_gmt\n"
             "assert len(GeneSpace.default()) == 19350 and len(read_gmt()) > 5000\n"
             "print(cellssl.loaders.__file__)")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(site)), done.stdout
    entry = (next(site.glob("cellssl-*.dist-info")) / "entry_points.txt").read_text()
    assert "cellssl = cellssl.engine.cli:main" in entry


def test_no_top_level_engine_kernels_or_loaders_importable(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                           "print([m for m in ('engine', 'kernels', 'loaders') if u.find_spec(m)])"],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.strip() == "[]"


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    """The interpreter the other kernel tests use accepts code the compiler rejects (a plain-float global, say):
    compile every launch the dispatchers make, in each constexpr variant and argument type, to a cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "cellssl.kernels.variants", "80", "90"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    lines = done.stdout.strip().splitlines()
    failed = [line for line in lines if not line.endswith(": ok")]
    assert done.returncode == 0 and not failed, "\n".join(failed)[:3000] + done.stderr[-2000:]
    assert len(lines) == 2 * 64  # per target: 3 mask, 1 kept count, 4 loss, 2 NB augmentation, 54 CSR launches


def test_gpu_check_runs_end_to_end_in_smoke_mode(tmp_path):
    """bench/gpu_check.py is what a GPU session runs once: its CPU smoke mode keeps it working between those."""
    import json

    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [k["name"] for k in report["kernels"]] == ["gene-programme mask", "masked loss (random)",
                                                       "masked loss (gene-programme)", "NB augmentation",
                                                       "CSR → dense + log1p"]
    assert all(k["max_abs_error"] < 1e-4 for k in report["kernels"])
    objectives = {o["objective"]: o for o in report["objectives"]}
    assert set(objectives) == {"mae_random", "mae_gene_program", "mae_gp_to_gp", "mae_gp_to_tf", "byol",
                               "barlow_twins", "reconstruction"}
    assert all(o["cells_per_s"] > 0 and o["bytes_per_batch_csr"] < o["bytes_per_batch_dense"]
               for o in objectives.values())
