"""scripts/lightning_fla_bench.py's CPU smoke run: --only times just the rows asked for (the
others say so), --no-checks skips the agreement checks, and the table is written."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("lightning_fla_bench", ROOT / "scripts/lightning_fla_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_only_and_no_checks(tmp_path, capsys):
    out = tmp_path / "t.md"
    _bench().main(["--device", "cpu", "--dtype", "fp32", "--lens", "32", "--heads", "2", "--dim", "16",
                   "--modes", "fwd", "--only", "ours tiled", "--no-checks", "--out", str(out)])
    text = out.read_text()
    rows = {ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| row")}
    assert float(rows["ours tiled (decay)"]) > 0 and float(rows["ours tiled (no decay)"]) > 0
    assert rows["cudnn dense"] == "not timed (--only)"
    assert "check " not in text  # --no-checks
    assert "s into the mode]" in capsys.readouterr().out  # each row printed as it finishes, with its time
