"""The `cellssl` command line: convert, synth, info; bad input gives exit status 2 and one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from cellssl.engine.cli import main
from cellssl.loaders import CellStore


def test_synth_convert_info(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "a.h5ad"), "--cells", "300", "--format", "h5ad", "--quiet"]) == 0
    assert main(["convert", "h5ad", str(tmp_path / "a.h5ad"), str(tmp_path / "a.cellstore"), "--split-by", "split",
                 "--quiet", "--codec", "zstd3"]) == 0
    store = CellStore(tmp_path / "a.cellstore", validate="full")
    assert store.n_genes == 19350 and store.attrs["layout"]["codec"] == "zstd3"
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a.cellstore"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cells"] == 300 and report["value_kind"] == "counts"
    assert report["obs_columns"]["cell_type"].startswith("categorical")


def test_bad_input_exit_code(tmp_path, capsys):
    assert main(["convert", "h5ad", str(tmp_path / "missing.h5ad"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellssl: error: ") and "missing.h5ad: file not found" in err and "Traceback" not in err
    assert main(["info", str(tmp_path)]) == 2


def test_console_script_installed(tmp_path):
    env = {**os.environ, "CELLSSL_CACHE": str(tmp_path)}
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cellssl"), "--help"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0 and "convert" in out.stdout


def test_a_closed_pipe_ends_quietly(synthetic_store):
    """`cellssl info STORE | head -1`: no BrokenPipeError traceback."""
    done = subprocess.run(f"{sys.executable} -m cellssl info {synthetic_store} | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("path:") and "Traceback" not in done.stderr and "Broken" not in done.stderr


def test_every_subcommand_refuses_abbreviations_and_bad_values(tmp_path, capsys):
    for args in (["synth", str(tmp_path / "x"), "--cell", "5"], ["info", "x", "--js"],
                 ["embed", "m", "s", "o.parquet", "--batch", "3"], ["plot", "r", "--ou", "x.png"],
                 ["convert", "h5ad", "a", "b", "--over"], ["synth", str(tmp_path / "x"), "--cells", "0"],
                 ["convert", "h5ad", "a", "b", "--val-frac", "1.5"], ["convert", "h5ad", "a", "b", "--workers", "0"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cellssl: error:"), (args, err)
    assert not (tmp_path / "x").exists()


def test_deepspeed_op_build_is_announced_before_it_happens(tmp_path, monkeypatch, capsys):
    from cellssl.engine.distributed import announce_op_build

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    announce_op_build(0)
    assert "building DeepSpeed's CPU communication op once" in capsys.readouterr().err
    built = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built.parent.mkdir(parents=True, exist_ok=True)
    built.write_bytes(b"")
    os.utime(built, (0, 0))  # older than DeepSpeed's sources: an upgrade rebuilds it
    announce_op_build(0)
    assert "rebuilding" in capsys.readouterr().err
    os.utime(built, None)
    announce_op_build(0)
    assert capsys.readouterr().err == ""


def test_plot_gives_objectives_of_other_scales_their_own_rows(tmp_path):
    from cellssl.engine.plot import plot_runs, rows_of

    for name, objective, loss in (("mae", "mae", 0.1), ("bt", "barlow_twins", 800.0), ("mae2", "mae", 0.2)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"objective": {"name": objective}}))
        (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss / s, "lr": 1e-3}) + "\n"
                                               for s in range(1, 4)) + json.dumps({"step": 3, "val_loss": loss}))
    runs = [tmp_path / n for n in ("mae", "bt", "mae2")]
    from cellssl.engine.plot import objective_of, read_log

    logs = {r.name: read_log(r) for r in runs}
    assert rows_of(logs, {r.name: objective_of(r) for r in runs}) == [["mae", "mae2"], ["bt"]]
    assert plot_runs(runs, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_every_options_help_renders():
    """argparse expands % in help texts: a field whose help says "60 % train" broke --help once."""
    import argparse

    from cellssl.engine.evaluate.config import EvalConfig
    from cellssl.engine.evaluate.transfer import StudyConfig
    from cellssl.engine.experiments import EXPERIMENTS
    from cellssl.engine.options import add_options

    for config in (*EXPERIMENTS.values(), EvalConfig(), StudyConfig()):
        parser = argparse.ArgumentParser()
        add_options(parser, config)
        assert "default:" in parser.format_help()
