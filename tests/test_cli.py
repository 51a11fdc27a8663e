"""The command line: real commands, one clear line and exit code 2 on bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ctrl_ray.cli import main


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_build_digits_and_pairs(tmp_path, capsys):
    data = tmp_path / "d.parquet"
    code, out, _ = _run(["data", "build-digits", "--size", "8", "--out", str(data)], capsys)
    assert code == 0 and data.is_file() and "1797 images" in out
    pairs = tmp_path / "p.parquet"
    code, out, _ = _run(["data", "pairs", "--dataset", str(data), "--label", "ink_class",
                         "--n", "50", "--out", str(pairs)], capsys)
    assert code == 0 and pairs.is_file() and "50 pairs" in out


@pytest.mark.parametrize("problem", ["missing", "corrupted", "unknown-label", "too-many"])
def test_bad_pairs_input_exits_2_with_one_line_and_writes_nothing(problem, tmp_path, capsys,
                                                                   digits8):
    dataset = digits8
    label, n = "compress_class", "10"
    if problem == "missing":
        dataset = tmp_path / "nope.parquet"
    elif problem == "corrupted":
        dataset = tmp_path / "bad.parquet"
        dataset.write_bytes(b"PAR1 this is not parquet")
    elif problem == "unknown-label":
        label = "sharpness"
    else:
        n = "100000"
    out_file = tmp_path / "out" / "pairs.parquet"
    code, _, err = _run(["data", "pairs", "--dataset", str(dataset), "--label", label,
                         "--n", n, "--out", str(out_file)], capsys)
    assert code == 2
    assert err.startswith("ctrl-ray: error: ") and err.count("\n") == 1
    assert not out_file.exists()


def test_bad_config_exits_2_naming_key_and_value(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  stepss: 10\n")
    code, _, err = _run(["pretrain", "--config", str(config)], capsys)
    assert code == 2 and "unknown config key 'training.stepss'" in err
    code, _, err = _run(["pretrain", "--config", str(config), "--set", "training=x"], capsys)
    assert code == 2 and "'training'" in err


def test_console_script_is_installed_and_rejects_bad_size(tmp_path):
    exe = shutil.which("ctrl-ray") or str(
        __import__("pathlib").Path(sys.executable).with_name("ctrl-ray"))
    result = subprocess.run([exe, "data", "build-digits", "--size", "7", "--out",
                             str(tmp_path / "x.parquet")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert not (tmp_path / "x.parquet").exists()
