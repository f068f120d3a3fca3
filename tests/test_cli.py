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
