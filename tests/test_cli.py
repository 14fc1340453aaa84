"""The command line: user errors give one clear line and exit 2; env vars set flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpredict.cli import build_parser, main


def test_synth_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = Path(__file__).parent / "fixtures" / "rtb_small.toml"
    out = tmp_path / "d"
    assert (
        main(["synth", "--rows", "3000", "--out", str(out), "--seed", "3", "--schema", str(schema)])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 3000 and summary["shards"] == 3
    assert main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3000


def test_synth_into_non_empty_dir_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    assert main(["synth", "--rows", "10", "--out", str(tmp_path / "d")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_train_on_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path / "none"), "--model-dir", str(tmp_path / "m")])
    assert code == 2
    err = capsys.readouterr().err
    assert "adpredict train: error:" in err and "does not exist" in err
    assert not (tmp_path / "m").exists()


def test_unknown_schema_kind_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\nversion = 1\n[[fields]]\nname = "a"\nscope = "candidate"\nkind = "text"\nbuckets = 8\n'
    )
    assert (
        main(["convert", "--input", str(bad), "--out", str(tmp_path / "o"), "--schema", str(bad)])
        == 2
    )
    err = capsys.readouterr().err
    assert "field 'a'" in err and "unknown kind 'text'" in err


def test_env_var_sets_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADPREDICT_EPOCHS", "3")
    args = build_parser().parse_args(["train", "--data", "d", "--model-dir", "m"])
    assert args.epochs == 3
    args = build_parser().parse_args(["train", "--data", "d", "--model-dir", "m", "--epochs", "2"])
    assert args.epochs == 2


def test_bad_env_var_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ADPREDICT_EPOCHS", "many")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "--data", "d", "--model-dir", "m"])
    assert exc.value.code == 2
    assert "ADPREDICT_EPOCHS='many'" in capsys.readouterr().err
