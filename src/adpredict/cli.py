"""The ``adpredict`` command line: one subcommand per job.

    adpredict synth    make synthetic bid logs with known click probabilities
    adpredict convert  turn CSV/TSV (or Criteo TSV) into training shards
    adpredict train    train LR/FM/DeepFM and export a servable version
    adpredict info     show a data set or exported model
    adpredict serve    serve the models of a model dir over gRPC
    adpredict predict  send an example request to a running server
    adpredict loadtest drive a running server with exchange-like traffic, report latency

Every flag can also be given as an environment variable ``ADPREDICT_<FLAG>`` (e.g.
``ADPREDICT_PORT=50052``); a flag on the command line wins. Errors a user can cause
print one line naming what was wrong and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adpredict import __version__
from adpredict.errors import AdpredictError

Handler = Callable[[argparse.Namespace], int]


class _EnvDefaults(argparse.ArgumentParser):
    """An ArgumentParser whose option defaults come from ``ADPREDICT_*`` variables."""

    def _env_default(self, action: argparse.Action) -> None:
        if not action.option_strings or action.dest in ("help", "version"):
            return
        var = "ADPREDICT_" + action.dest.upper()
        if var not in os.environ:
            return
        raw = os.environ[var]
        if isinstance(action, argparse._StoreTrueAction):
            action.default = raw.strip().lower() in ("1", "true", "yes", "on")
            return
        try:
            action.default = action.type(raw) if action.type else raw
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            self.error(f"environment variable {var}={raw!r} is not a valid {action.dest} ({exc})")
        action.required = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        for action in self._actions:
            self._env_default(action)
        return super().parse_known_args(args, namespace)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# ---- synth -------------------------------------------------------------------------------
def _cmd_synth(args: argparse.Namespace) -> int:
    import math

    from adpredict.data import records, synth
    from adpredict.schema import load_schema

    schema = load_schema(args.schema)
    synth.check_schema(schema)
    rows_per_shard = args.rows_per_shard or max(1000, math.ceil(args.rows / 10))
    with records.DatasetWriter(
        args.out,
        schema,
        rows_per_shard=rows_per_shard,
        has_true_ctr=True,
        source=f"synth rows={args.rows} seed={args.seed} ctr={args.ctr}",
    ) as writer:
        for block in synth.generate(args.rows, args.seed, target_ctr=args.ctr):
            writer.write_columns(block.columns, block.labels, block.true_ctr)
    info = records.read_manifest(args.out)
    print(
        json.dumps(
            {
                "out": str(info.path),
                "rows": info.rows,
                "shards": len(info.shards),
                "schema": schema.name,
            }
        )
    )
    return 0


# ---- convert -----------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    from adpredict.data import convert

    info = convert.convert(
        args.input,
        args.out,
        fmt=args.format,
        schema_spec=args.schema,
        rows_per_shard=args.rows_per_shard,
        delimiter=args.delimiter,
    )
    print(
        json.dumps(
            {
                "out": str(info.path),
                "rows": info.rows,
                "shards": len(info.shards),
                "schema": info.schema.name,
            }
        )
    )
    return 0


# ---- train -------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from adpredict.model.train import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        optimizer=args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        dim=args.dim,
        l2=args.l2,
        min_count=args.min_count,
        hidden=args.hidden,
        holdout_every=args.holdout_every,
        seed=args.seed,
        init_from=args.init_from,
        checkpoint=not args.no_checkpoint,
    )
    result = train(args.data, args.model_dir, config, progress=not args.quiet)
    summary: dict[str, Any] = {"metrics": result.metrics}
    if result.export:
        ex = result.export
        summary["export"] = {
            "path": str(ex.path),
            "version": ex.version,
            "export_bytes": ex.export_bytes,
            "checkpoint_path": str(ex.checkpoint_path) if ex.checkpoint_path else None,
            "checkpoint_bytes": ex.checkpoint_bytes,
        }
    text = json.dumps(summary, indent=2)
    if args.metrics_out:
        Path(args.metrics_out).write_text(text + "\n")
    print(text)
    return 0


# ---- info --------------------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "manifest.json").is_file():
        from adpredict.data.records import read_manifest

        info = read_manifest(path)
        out: dict[str, Any] = {
            "data_set": str(info.path),
            "rows": info.rows,
            "shards": len(info.shards),
            "schema": info.schema.name,
            "has_true_ctr": info.has_true_ctr,
            "source": info.source,
        }
    else:
        from adpredict.model.export import read_metadata, resolve_version_dir

        meta = read_metadata(resolve_version_dir(path))
        out = {k: meta.get(k) for k in ("version", "created", "model", "metrics", "export_bytes")}
        out["schema"] = meta["schema"]["name"]
    print(json.dumps(out, indent=2))
    return 0


# ---- serve / predict ---------------------------------------------------------------------
class _OptionValueError(argparse.ArgumentTypeError, ValueError):
    """A bad flag value; argparse shows the message, the env-var path catches ValueError."""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _OptionValueError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise _OptionValueError(f"a port must be in [0, 65535], got {value}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _OptionValueError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise _OptionValueError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _amount(*, positive: bool) -> Callable[[str], float]:
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _OptionValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise _OptionValueError(
                f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}"
            )
        return value

    parse.__name__ = "positive number" if positive else "non-negative number"
    return parse


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from adpredict.serving.server import (
        ReadyInfo,
        ServerOptions,
        Supervisor,
        configure_logging,
        serve_forever,
    )

    options = ServerOptions(
        model_dir=Path(args.model_dir),
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host or "",
        metrics_dir=args.metrics_dir or "",
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        sla_ms=args.sla_ms,
        queue_limit=args.queue_limit,
        compute_threads=args.compute_threads,
        no_batching=args.no_batching,
        max_candidates=args.max_candidates,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        frontend=args.frontend,
        io_priority=args.io_priority,
        admit_within_sla=args.admit_within_sla,
        tls_cert=args.tls_cert or "",
        tls_key=args.tls_key or "",
        tls_client_ca=args.tls_client_ca or "",
        poll_interval_s=args.poll_interval_s,
        grace_s=args.grace_s,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        default_model=args.default_model or "",
    )
    configure_logging(args.log_level)

    def on_ready(info: ReadyInfo) -> None:
        print(info.describe(), flush=True)
        tls = " --tls-ca CA_FILE" if options.tls_cert else ""
        if options.tls_client_ca:
            tls += " --tls-cert CLIENT_CERT --tls-key CLIENT_KEY"
        print(f"try: adpredict predict --target {info.target}{tls} --example", flush=True)

    if options.workers == 1:
        asyncio.run(serve_forever(options, on_ready=on_ready))
        return 0
    return Supervisor(options, on_ready=on_ready, log_level=args.log_level).run()


def _cmd_predict(args: argparse.Namespace) -> int:
    from adpredict.client import channel_credentials, predict_example

    if not args.example:
        raise AdpredictError(
            "nothing to send: pass --example (a request built from the model's schema)"
        )
    credentials = None
    if args.tls_ca or args.client_tls_cert or args.client_tls_key:
        credentials = channel_credentials(args.tls_ca, args.client_tls_cert, args.client_tls_key)
    result = predict_example(
        args.target,
        model=args.model,
        k=args.k,
        timeout_s=args.timeout_ms / 1e3,
        credentials=credentials,
    )
    print(json.dumps(result, indent=2))
    return 0


def _add_serve_parsers(sub: Any) -> None:
    from adpredict.serving.server import DEFAULT_METRICS_PORT, DEFAULT_PORT, default_workers

    cores = default_workers()
    p = sub.add_parser("serve", help="serve the models of a model dir over gRPC")
    p.add_argument("--model-dir", required=True, help="MODELS: serves every MODELS/NAME/VERSION")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 or [::] for all "
        "interfaces: without --tls-cert the service has no encryption or authentication)",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"gRPC port (default {DEFAULT_PORT}; 0 = any free port, one worker only)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus metrics port (default {DEFAULT_METRICS_PORT}; 0 = none)",
    )
    p.add_argument(
        "--metrics-host",
        default="",
        help="address of the metrics endpoint (default: the same as --host)",
    )
    p.add_argument(
        "--metrics-dir",
        default="",
        help="with --workers > 1: directory the workers write their metrics to, emptied at "
        "start (default: a private temporary directory)",
    )
    p.add_argument(
        "--workers",
        type=_count(1),
        default=cores,
        help=f"serving processes sharing the port (default: the cores, {cores} here; "
        "1 = no supervisor)",
    )
    p.add_argument(
        "--max-batch-size",
        type=_count(1),
        default=4096,
        help="predictions per compute call (default 4096; 1 = no batching)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=_amount(positive=False),
        default=0.0,
        help="longest a request waits for others when a compute thread is free (default 0: "
        "dispatch at once; batches form from requests arriving while compute is busy)",
    )
    p.add_argument(
        "--sla-ms",
        type=_amount(positive=True),
        default=20.0,
        help="budget of a request without a gRPC deadline (default 20)",
    )
    p.add_argument(
        "--queue-limit",
        type=_count(1),
        default=8192,
        help="queued predictions per model before refusing (default 8192)",
    )
    p.add_argument(
        "--compute-threads",
        type=_count(1),
        default=1,
        help="batches computed at once per model and worker (default 1)",
    )
    p.add_argument(
        "--no-batching", action="store_true", help="compute every request alone, in one call"
    )
    p.add_argument(
        "--max-candidates",
        type=_count(1),
        default=1024,
        help="candidates per request (default 1024)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=_count(1024),
        default=4 * 1024 * 1024,
        help="gRPC message size limit (default 4 MiB)",
    )
    p.add_argument(
        "--max-concurrent-rpcs",
        type=_count(0),
        default=16_384,
        help="RPCs in progress at once per worker, beyond which RESOURCE_EXHAUSTED "
        "(default 16384; 0 = unlimited)",
    )
    p.add_argument(
        "--admit-within-sla",
        action="store_true",
        help="also refuse at once a request whose answer is predicted after --sla-ms, even if "
        "its deadline is later: under overload, admitted requests stay within the SLA",
    )
    p.add_argument(
        "--frontend",
        choices=("grpcio", "native"),
        default="grpcio",
        help="who receives RPCs: grpcio (grpc.aio on the event loop; default) or native (the "
        "C++ intake: far cheaper per RPC, refuses overload before Python; no reflection)",
    )
    p.add_argument(
        "--io-priority",
        type=_count(0),
        default=0,
        help="with --frontend native: run gRPC's and the intake's threads at this SCHED_RR "
        "priority (1-99), so calls are read and refusals sent before TensorFlow resumes on a "
        "busy core; needs CAP_SYS_NICE (root, or docker --cap-add SYS_NICE); default 0 = off",
    )
    p.add_argument("--tls-cert", default="", help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default="",
        help="PEM CA bundle: mutual TLS, clients must present a certificate it signed",
    )
    p.add_argument(
        "--default-model",
        default=None,
        help="model for requests without a name (default: the only model, else the "
        "alphabetically first)",
    )
    p.add_argument(
        "--grace-s",
        type=_amount(positive=False),
        default=5.0,
        help="on SIGTERM, time for in-flight requests to finish (default 5)",
    )
    p.add_argument(
        "--poll-interval-s",
        type=_amount(positive=True),
        default=2.0,
        help="how often to look for new model versions (default 2)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=_count(0),
        default=0,
        help="TensorFlow intra-op threads per worker (default 0 = automatic)",
    )
    p.add_argument(
        "--inter-op-threads",
        type=_count(0),
        default=0,
        help="TensorFlow inter-op threads per worker (default 0 = automatic)",
    )
    p.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO", type=str.upper
    )
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("predict", help="send an example request to a running server")
    p.add_argument("--target", required=True, help="HOST:PORT of the server")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--k", type=_count(1), default=32, help="candidates (default 32)")
    p.add_argument(
        "--timeout-ms",
        type=_amount(positive=True),
        default=5000.0,
        help="deadline per call (default 5000)",
    )
    p.add_argument(
        "--example",
        action="store_true",
        help="send a realistic request built from the model's schema",
    )
    p.add_argument(
        "--tls-ca",
        default="",
        help="use TLS, trusting this PEM CA bundle (or the system's roots with --tls-cert)",
    )
    p.add_argument(
        "--tls-cert",
        dest="client_tls_cert",
        default="",
        help="PEM client certificate, for a server with mutual TLS (env ADPREDICT_CLIENT_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        dest="client_tls_key",
        default="",
        help="PEM private key of the client certificate (env ADPREDICT_CLIENT_TLS_KEY)",
    )
    p.set_defaults(handler=_cmd_predict)


# ---- loadtest ----------------------------------------------------------------------------
def _cmd_loadtest(args: argparse.Namespace) -> int:
    from adpredict.loadtest import run_from_args

    return run_from_args(args)


def _add_loadtest_parser(sub: Any) -> None:
    from adpredict.loadtest import add_arguments

    p = sub.add_parser(
        "loadtest",
        help="drive a running server with exchange-like traffic and report latency",
        description="Open-loop (--rate) or closed-loop (--concurrency) Predict traffic built "
        "from the model's schema; see the docstring of adpredict.loadtest.",
    )
    add_arguments(p)
    p.set_defaults(handler=_cmd_loadtest)


def build_parser() -> argparse.ArgumentParser:
    parser = _EnvDefaults(prog="adpredict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"adpredict {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_EnvDefaults)

    p = sub.add_parser("synth", help="generate synthetic bid logs (built-in rtb schema)")
    p.add_argument("--rows", type=_positive_int, required=True, help="number of impressions")
    p.add_argument("--out", required=True, help="output data set directory (must not exist)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same rows)")
    p.add_argument("--ctr", type=float, default=0.02, help="target mean CTR (default 0.02)")
    p.add_argument("--rows-per-shard", type=_positive_int, default=None)
    p.add_argument(
        "--schema",
        default="rtb",
        help="rtb, or a schema file with the rtb fields (bucket counts may differ)",
    )
    p.set_defaults(handler=_cmd_synth)

    p = sub.add_parser("convert", help="convert CSV/TSV or Criteo TSV into training shards")
    p.add_argument(
        "--input", required=True, nargs="+", help="input file(s); .gz is read transparently"
    )
    p.add_argument("--out", required=True, help="output data set directory (must not exist)")
    p.add_argument("--format", choices=("csv", "tsv", "criteo"), default="csv")
    p.add_argument(
        "--schema",
        default=None,
        help="schema name (rtb, criteo) or file; default rtb (criteo for --format criteo)",
    )
    p.add_argument("--delimiter", default=None, help="override the field delimiter")
    p.add_argument("--rows-per-shard", type=_positive_int, default=100_000)
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("train", help="train a model and export a new version")
    p.add_argument("--data", required=True, help="data set directory (from synth/convert)")
    p.add_argument("--model-dir", required=True, help="MODELS/NAME: versions are written under it")
    p.add_argument("--model", choices=("lr", "fm", "deepfm"), default="deepfm")
    p.add_argument(
        "--optimizer", choices=("lazyadam", "adam", "adagrad", "ftrl"), default="lazyadam"
    )
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=1024)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--dim", type=_positive_int, default=8, help="embedding dimension (fm, deepfm)")
    p.add_argument(
        "--l2", type=float, default=1e-4, help="L2 penalty on the table rows each example touches"
    )
    p.add_argument(
        "--min-count",
        type=_positive_int,
        default=1,
        help="feature admission: values seen fewer times in training share the missing bucket",
    )
    p.add_argument("--hidden", type=_int_list, default=(64, 32), help="MLP widths (deepfm)")
    p.add_argument(
        "--holdout-every",
        type=int,
        default=10,
        help="hold out every Nth record of each shard for evaluation",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from",
        default=None,
        help="warm start from an exported version (or a model dir: its latest)",
    )
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not keep a training checkpoint with optimizer slots",
    )
    p.add_argument("--metrics-out", default=None, help="also write the metrics JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("info", help="describe a data set or an exported model")
    p.add_argument("path")
    p.set_defaults(handler=_cmd_info)

    _add_serve_parsers(sub)
    _add_loadtest_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except AdpredictError as exc:
        print(f"adpredict {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adpredict {args.command}: interrupted", file=sys.stderr)
        return 130
