"""TLS and mutual TLS on the gRPC port, with certificates made by the ``openssl`` CLI at test time.

Two real servers on loopback (``PredictionServer``: runtime, servicer, health): one with TLS, one
with mutual TLS. Proven: a plaintext client, or a client that does not trust the server's CA, is
refused under TLS; under mutual TLS a client without a certificate, or with one from another CA,
is refused; good clients are served (Predict, health, the ``adpredict predict`` command); bad
files stop the start-up with a ``StartupError`` naming the file, before TensorFlow loads.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpredict.cli import main
from adpredict.client import AsyncPredictionClient, build_request, channel_credentials
from adpredict.errors import AdpredictError, RequestError, StartupError
from adpredict.serving import intake
from adpredict.serving.server import PredictionServer, ServerOptions, tls_credentials
from adpredict.v1 import prediction_service_pb2 as pb

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
on_module_loop = pytest.mark.asyncio(loop_scope="module")  # the loop the servers run on

RPC_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server and a client certificate it signed, and a rogue CA's client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (d / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext, cwd=d)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "test-ca")
    rogue = _ca(d, "rogue-ca")
    server = _leaf(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth\n")  # fmt: skip
    client = _leaf(d, "client", ca, "extendedKeyUsage=clientAuth\n")
    rogue_client = _leaf(d, "rogue-client", rogue, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, rogue[0], *rogue_client)


@dataclass
class Servers:
    tls: str  # target of the TLS server
    mtls: str  # target of the mutual-TLS server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(
    pki: Pki, small_model_root: Path, tmp_path_factory: pytest.TempPathFactory, frontend: str
) -> AsyncIterator[Servers]:
    """A TLS and a mutual-TLS server, for each front end (``frontend``, conftest.py)."""
    root = tmp_path_factory.mktemp("tls") / "models"
    shutil.copytree(small_model_root, root)
    common = dict(
        model_dir=root, port=0, metrics_port=0, warmup_batches=1, grace_s=1.0, frontend=frontend
    )
    tls = PredictionServer(
        ServerOptions(**common, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    )
    mtls = PredictionServer(
        ServerOptions(
            **common,
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca),
        )
    )
    started = []
    try:
        for server in (tls, mtls):
            await server.start()
            started.append(server)
        yield Servers(f"127.0.0.1:{tls.port}", f"127.0.0.1:{mtls.port}")
    finally:
        for server in started:
            await server.drain()


def _request() -> pb.PredictRequest:
    return build_request({"country": "C001"}, [{"creative_id": "cr-1"}, {"creative_id": "cr-2"}])


async def _predict(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    """Candidates answered; ``RequestError`` (cause: the ``grpc.RpcError``) if refused."""
    async with AsyncPredictionClient(
        target, timeout_s=RPC_TIMEOUT_S, credentials=credentials
    ) as client:
        return len((await client.predict_request(_request())).probabilities)


async def _refused(target: str, credentials: grpc.ChannelCredentials | None) -> None:
    with pytest.raises(RequestError) as info:
        await _predict(target, credentials)
    # The handshake fails: the call never reaches the service (not a timeout, not a status).
    assert info.value.__cause__.code() == grpc.StatusCode.UNAVAILABLE, info.value


@on_module_loop
async def test_tls_serves_a_trusting_client_and_refuses_plaintext(
    servers: Servers, pki: Pki
) -> None:
    good = channel_credentials(pki.ca)
    assert await _predict(servers.tls, good) == 2
    await _refused(servers.tls, None)  # plaintext
    await _refused(servers.tls, channel_credentials(pki.rogue_ca))  # does not trust our CA
    # Health shares the port and its credentials.
    async with grpc.aio.secure_channel(servers.tls, good) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert await _predict(servers.tls, good) == 2  # refusals did not disturb the server


@on_module_loop
async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    servers: Servers, pki: Pki
) -> None:
    await _refused(servers.mtls, None)
    await _refused(servers.mtls, channel_credentials(pki.ca))  # TLS but no client certificate
    rogue = channel_credentials(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)
    await _refused(servers.mtls, rogue)  # a certificate from a CA the server does not trust
    good = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    assert await _predict(servers.mtls, good) == 2


@on_module_loop
async def test_predict_command_speaks_mutual_tls(
    servers: Servers, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", "--target", servers.mtls, "--example", "--k", "3", "--tls-ca", str(pki.ca)]
    # In a thread: the blocking client must not stall the event loop the servers run on.
    assert await asyncio.to_thread(main, args) == 2  # no client certificate: refused
    assert "UNAVAILABLE" in capsys.readouterr().err
    args += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert await asyncio.to_thread(main, args) == 0
    assert '"candidates": 3' in capsys.readouterr().out


def _options(**tls: object) -> ServerOptions:
    return ServerOptions(model_dir=Path("."), **tls)  # type: ignore[arg-type]


@on_module_loop
async def test_bad_tls_files_are_startup_errors_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    cert, key = str(pki.server_cert), str(pki.server_key)
    missing = str(tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cases = {
        "missing cert": (dict(tls_cert=missing, tls_key=key), f"{missing}: cannot read it"),
        "missing key": (dict(tls_cert=cert, tls_key=missing), f"{missing}: cannot read it"),
        "directory": (dict(tls_cert=str(tmp_path), tls_key=key), f"{tmp_path}: cannot read it"),
        "empty": (dict(tls_cert=str(empty), tls_key=key), f"{empty}: the file is empty"),
        "key as cert": (dict(tls_cert=key, tls_key=key), f"{key}: not a PEM certificate"),
        "cert as key": (dict(tls_cert=cert, tls_key=cert), f"{cert}: not a PEM private key"),
        "junk cert": (dict(tls_cert=str(junk), tls_key=key), f"{junk}: not a valid PEM"),
        "mismatched key": (
            dict(tls_cert=cert, tls_key=str(pki.client_key)),
            f"{pki.client_key}: does not match the certificate in {cert}",
        ),
        "missing client CA": (
            dict(tls_cert=cert, tls_key=key, tls_client_ca=missing),
            f"TLS client CA {missing}: cannot read it",
        ),
        "client CA not PEM": (
            dict(tls_cert=cert, tls_key=key, tls_client_ca=str(pki.client_key)),
            f"TLS client CA {pki.client_key}: not a PEM certificate",
        ),
    }
    for name, (tls, message) in cases.items():
        with pytest.raises(StartupError) as info:
            tls_credentials(_options(**tls))
        assert message in str(info.value), (name, str(info.value))
    assert tls_credentials(_options()) is None
    assert tls_credentials(_options(tls_cert=cert, tls_key=key, tls_client_ca=str(pki.ca)))
    with pytest.raises(StartupError, match="tls_cert and tls_key go together"):
        _options(tls_cert=cert)
    with pytest.raises(StartupError, match=r"tls_client_ca .* needs tls_cert"):
        _options(tls_client_ca=str(pki.ca))
    with pytest.raises(AdpredictError, match="certificate and its key go together"):
        channel_credentials(pki.ca, pki.client_cert)
    with pytest.raises(AdpredictError, match=f"TLS CA {missing}: cannot read it"):
        channel_credentials(missing)


@pytest.mark.skipif(not intake.available() and os.environ.get("CI") != "true", reason="no native")
def test_native_tls_works_when_tensorflow_was_imported_first(pki: Pki) -> None:
    """TensorFlow exports its own BoringSSL globally; the native intake must not bind to it
    (it did, and crashed at the first TLS handshake). Fresh process: the import order is it."""
    script = f"""
import tensorflow, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from adpredict.serving import intake  # after tensorflow
from pathlib import Path
read = lambda p: Path(p).read_text()
server = intake._intake.Intake("127.0.0.1:0", ["/x/Y"], 8, 1 << 20, False,
    read({str(pki.server_cert)!r}), read({str(pki.server_key)!r}), "", [""])
port = server.start()
server.set_serving(True)
creds = grpc.ssl_channel_credentials(read({str(pki.ca)!r}).encode())
with grpc.secure_channel(f"127.0.0.1:{{port}}", creds) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
server.stop(0.5)
print("status", reply.status)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "status 1" in out.stdout  # SERVING


def test_serve_command_reports_a_bad_tls_file_at_once(
    pki: Pki, small_model_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.key"
    args = ["serve", "--model-dir", str(small_model_root), "--port", "0", "--metrics-port", "0",
            "--workers", "1", "--tls-cert", str(pki.server_cert), "--tls-key", str(missing)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"TLS key {missing}: cannot read it" in err, err
    assert "loaded" not in err  # reported before any model was loaded
    assert main(["serve", "--model-dir", ".", "--tls-client-ca", str(pki.ca)]) == 2
    assert "tls_client_ca (mutual TLS) needs tls_cert" in capsys.readouterr().err
