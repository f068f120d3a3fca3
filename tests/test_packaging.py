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


def install_wheel(tmp_path) -> tuple[Path, Path]:
    """The wheel built from a copy of the tree, unpacked into a fresh venv that reaches the dependencies (not this
    checkout, not the editable finder: paths listed in a .pth file have their own .pth files ignored) through the
    test environment. Returns (its python, its site-packages)."""
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "runs", "data", "__pycache__",
                                                                "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("cellssl-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), str(site)], check=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_the_wheel_alone_runs_the_whole_flow(tmp_path):
    """From a folder outside the repository, with only the wheel's files: synth → train 2 steps (python -m
    cellssl.train, the packaged DeepSpeed config) → embed → eval with fine-tuning."""
    python, site = install_wheel(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "MASTER_PORT")}

    def cellssl(*args, module="cellssl"):
        done = subprocess.run([str(python), "-m", module, *map(str, args)], capture_output=True, text=True, cwd=work,
                              env=env, timeout=600)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done

    probe = ("import cellssl, cellssl.loaders, cellssl.engine.cli, cellssl.engine.evaluate.suite, cellssl.train\n"
             "from cellssl.loaders.genes import GeneSpace\n"
             "from cellssl.loaders.genesets import read_gmt\n"
             "assert len(GeneSpace.default()) == 19350 and len(read_gmt()) > 5000\n"
             "print(cellssl.__file__, cellssl.loaders.__file__)")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(p.startswith(str(site)) for p in done.stdout.split()), done.stdout
    entry = (next(site.glob("cellssl-*.dist-info")) / "entry_points.txt").read_text()
    assert "cellssl = cellssl.engine.cli:main" in entry
    (work / "genes.txt").write_text("\n".join(__import__("cellssl.loaders", fromlist=["GeneSpace"]).GeneSpace
                                              .default().gene_id[:2000]))
    cellssl("synth", "s.cellstore", "--cells", "1200", "--genes", "genes.txt", "--quiet")
    cellssl("mae_random", "--data", "s.cellstore", "--out", "run", "--max-steps", "2", "--batch-size", "64",
            module="cellssl.train")
    cellssl("embed", "run", "s.cellstore", "e.parquet")
    cellssl("eval", "run", "--data", "s.cellstore", "--out", "ev", "--finetune-steps", "2", "--batch-size", "64",
            "--tasks", "cell_type", "--no-baselines", "--no-plots")
    results = __import__("json").loads((work / "ev" / "results.json").read_text())
    assert "finetune" in results["cell_type"]["run"]
    assert "--label-shares" in cellssl("study", "--help").stdout  # the transfer study needs no checkout
    assert "--targets" in cellssl("--help", module="cellssl.engine.evaluate.byol_check").stdout  # nor its check


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
    clean = {k: v for k, v in os.environ.items()  # another test's in-process run may have set them
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=clean)
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
