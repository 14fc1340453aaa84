"""``adpredict serve`` / ``adpredict predict``: flag and env-var errors, and start-up failures.

Argument errors are checked in-process through ``main``; start-up failures run the real command
in a subprocess and check its exit status and its one-line error.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adpredict.cli import build_parser, main
from adpredict.serving.server import ServerOptions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port someone else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_adpredict_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("ADPREDICT_"):
            monkeypatch.delenv(var)


def serve(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "adpredict", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("adpredict serve:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port", "70000", "argument --port: a port must be in [0, 65535], got 70000"),
        ("--port", "http", "argument --port: expected a port number, got 'http'"),
        ("--workers", "0", "argument --workers: must be an integer >= 1, got 0"),
        ("--max-wait-ms", "-1", "argument --max-wait-ms: must be a finite number >= 0, got -1"),
        ("--sla-ms", "nan", "argument --sla-ms: must be a finite number > 0, got nan"),
        ("--max-batch-size", "1.5", "argument --max-batch-size: expected an integer, got '1.5'"),
    ],
)
def test_bad_flag_values_are_named(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model-dir", "models", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("ADPREDICT_PORT", "abc", "environment variable ADPREDICT_PORT='abc' is not a valid port"),
        ("ADPREDICT_WORKERS", "0", "ADPREDICT_WORKERS='0' is not a valid workers"),
        ("ADPREDICT_GRACE_S", "-3", "ADPREDICT_GRACE_S='-3' is not a valid grace_s"),
    ],
)
def test_bad_env_values_are_named(
    var: str,
    value: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model-dir", "models"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_env_values_set_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADPREDICT_MODEL_DIR", "/srv/models")
    monkeypatch.setenv("ADPREDICT_MAX_WAIT_MS", "0.5")
    monkeypatch.setenv("ADPREDICT_NO_BATCHING", "yes")
    monkeypatch.setenv("ADPREDICT_PORT", "6000")
    args = build_parser().parse_args(["serve", "--port", "7000"])
    assert (args.model_dir, args.max_wait_ms, args.no_batching, args.port) == (
        "/srv/models",
        0.5,
        True,
        7000,
    )
    defaults = build_parser().parse_args(["serve", "--model-dir", "m"])
    assert defaults.host == "127.0.0.1" and defaults.metrics_port == 9090


def test_serve_flag_defaults_are_the_server_options_defaults() -> None:
    """The parser repeats ServerOptions' defaults (it must not import the server to build
    --help); this keeps the two from drifting apart when a default changes."""
    args = vars(build_parser().parse_args(["serve", "--model-dir", "m"]))
    intended = {"model_dir", "workers", "default_model"}  # required / "cores" / None = first
    checked = 0
    for f in dataclasses.fields(ServerOptions):
        if f.name in args and f.name not in intended:
            assert args[f.name] == f.default, f.name
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2", "--port", "0"], "--workers 2 needs an explicit --port"),
        (["--queue-limit", "10"], "queue_limit (10) must be >= max_candidates (1024)"),
        (["--port", "5000", "--metrics-port", "5000"], "metrics_port and port are both 5000"),
        (["--io-priority", "5"], "io_priority 5 needs frontend 'native'"),
        (
            ["--frontend", "native", "--io-priority", "100"],
            "io_priority must be in [0, 99], got 100",
        ),
    ],
)
def test_conflicting_options_fail_before_starting(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adpredict serve: error: invalid server options:") and message in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_missing_model_dir_names_it(tmp_path: Path, workers: str) -> None:
    missing = tmp_path / "no-such-models"
    result = serve("--model-dir", str(missing), "--port", str(free_port()), "--metrics-port",
                   "0", "--workers", workers)  # fmt: skip
    assert result.returncode == 2
    assert error_line(result) == (
        f"adpredict serve: error: model dir {missing} does not exist or is not a directory"
    )


@pytest.mark.parametrize("which", ["port", "metrics-port"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_is_a_clear_error(
    tmp_path: Path, taken_port: int, which: str, workers: str
) -> None:
    ports = {"port": str(free_port()), "metrics-port": str(free_port())}
    ports[which] = str(taken_port)
    result = serve("--model-dir", str(tmp_path), "--port", ports["port"], "--metrics-port",
                   ports["metrics-port"], "--workers", workers)  # fmt: skip
    assert result.returncode == 2
    what = "gRPC port" if which == "port" else "metrics port"
    assert error_line(result) == (
        f"adpredict serve: error: cannot listen on 127.0.0.1:{taken_port} ({what}): already in use"
    )


def test_unusable_metrics_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = serve("--model-dir", str(tmp_path), "--port", str(free_port()), "--metrics-port",
                   str(free_port()), "--workers", "2", "--metrics-dir", f"{blocker}/metrics")  # fmt: skip
    assert result.returncode == 2
    assert error_line(result).startswith(
        f"adpredict serve: error: cannot use metrics dir {blocker}/metrics for worker metrics: "
    )


def test_no_servable_model_stops_the_supervisor(tmp_path: Path) -> None:
    # The runtime's own tests cover the message; here: a worker that cannot start makes the
    # supervisor give up (no restart loop) with the worker's error and status 2.
    (tmp_path / "ctr" / "1").mkdir(parents=True)  # a version without any files
    result = serve("--model-dir", str(tmp_path), "--port", str(free_port()), "--metrics-port",
                   "0", "--workers", "2")  # fmt: skip
    assert result.returncode == 2
    line = error_line(result)
    assert f"no servable model under {tmp_path}" in line and "not an adpredict export" in line


def test_predict_needs_example_and_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--target", "127.0.0.1:1"]) == 2
    assert "pass --example" in capsys.readouterr().err
    target = f"127.0.0.1:{free_port()}"
    assert main(["predict", "--target", target, "--example", "--timeout-ms", "3000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adpredict predict: error: UNAVAILABLE")
