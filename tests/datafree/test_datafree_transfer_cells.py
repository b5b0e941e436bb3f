"""Cell selection of benchmarks/datafree_transfer.py, which benchmarks/datafree_parallel.sh relies on."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "datafree_transfer.py"


@pytest.fixture(scope="module")
def transfer():
    spec = importlib.util.spec_from_file_location("datafree_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(transfer, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["datafree_transfer.py", *argv])
    transfer.main()


def test_list_prints_every_cell_of_the_table(transfer, monkeypatch, capsys):
    _main(transfer, monkeypatch, "--table", "abd", "--list")
    cells = capsys.readouterr().out.split()
    expected = [f"{a}:{m}" for a, methods in transfer.PROTOCOLS["abd"].items() for m in methods]
    assert cells == expected
    assert "badnets:zskt+abd" in cells and "sig_abd:clean_kd" in cells


def test_unknown_cell_is_a_usage_error_naming_it(transfer, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _main(transfer, monkeypatch, "--smoke", "--out", str(tmp_path), "--only", "badnets:zkst")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "badnets:zkst" in err and "--list" in err
    assert not any(tmp_path.iterdir())  # nothing was trained


def test_report_before_any_run_lists_missing_cells(transfer, monkeypatch, capsys, tmp_path):
    _main(transfer, monkeypatch, "--smoke", "--out", str(tmp_path), "--report")
    assert "not run yet: badnets:zskt" in capsys.readouterr().out
    assert not (tmp_path / "smoke" / "teachers").exists()


def test_teacher_cell_trains_only_the_teacher(transfer, monkeypatch, capsys, tmp_path):
    _main(transfer, monkeypatch, "--smoke", "--out", str(tmp_path), "--only", "badnets:teacher")
    root = tmp_path / "smoke"
    assert (root / "teachers" / "badnets_s0" / "metrics.json").exists()
    assert not (root / "teachers" / "blend_s0").exists()
    assert not (root / "badnets").exists()  # no student cell ran
    assert "not run yet: badnets:zskt" in capsys.readouterr().out
