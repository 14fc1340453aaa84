"""The committed generated code in src/adpredict/v1 matches proto/ (regenerated with `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "adpredict/v1/prediction_service.proto"
GENERATED = (
    "adpredict/v1/prediction_service_pb2.py",
    "adpredict/v1/prediction_service_pb2.pyi",
    "adpredict/v1/prediction_service_pb2_grpc.py",
)


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    # Exactly the Makefile's command, with the output directories pointed at tmp_path.
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-Iproto",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"proto/{PROTO}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )  # fmt: skip
    stale = [
        name
        for name in GENERATED
        if (tmp_path / name).read_bytes() != (ROOT / "src" / name).read_bytes()
    ]
    if stale:
        pytest.fail(f"generated code is out of date with proto/{PROTO}: {stale}; run `make proto`")


def test_generated_package_is_importable() -> None:
    assert (ROOT / "src/adpredict/v1/__init__.py").is_file()
    from adpredict.v1 import prediction_service_pb2 as pb
    from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["PredictionService"]
    assert [m.name for m in service.methods] == ["Predict", "GetModelMetadata"]
    assert hasattr(pb_grpc, "add_PredictionServiceServicer_to_server")
