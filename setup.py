"""Builds the optional native parts: the gRPC intake and the codec's value scan.

Everything else about the package is in pyproject.toml.

* ``adpredict.serving._intake`` needs grpc++ (Debian: ``libgrpc++-dev``, found with
  ``pkg-config grpc++``) and pybind11. Without them the package installs without it and
  ``adpredict serve`` uses the grpc.aio front end; ``make`` installs them (``make native-deps``).
* ``adpredict.serving._scan`` needs only a C compiler and Python's headers. Without it the
  codec checks values in Python (same results; decode measured 337 against 200 µs per
  K = 300 request).
* ``adpredict.serving._wire`` (PredictRequest bytes straight to the codec's arrays) needs a C
  compiler and numpy's headers (numpy installed before this package is built, as ``make``
  does). Without it requests are parsed by upb and decoded in Python (same results).

``ADPREDICT_NATIVE=0`` skips both, ``=1`` makes a failed build an error.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup


def _pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args, "grpc++"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or "pkg-config grpc++ failed")
    return shlex.split(out.stdout)


def native_extensions() -> list[Extension]:
    wanted = os.environ.get("ADPREDICT_NATIVE", "auto")
    if wanted == "0":
        return []
    scan = Extension(
        "adpredict.serving._scan",
        ["src/adpredict/serving/_scan.c"],
        extra_compile_args=["-O2", "-fvisibility=hidden"],
        optional=wanted != "1",
    )
    extensions = [scan]
    try:
        import numpy

        extensions.append(
            Extension(
                "adpredict.serving._wire",
                ["src/adpredict/serving/_wire.c"],
                depends=["src/adpredict/serving/_values.h", "src/adpredict/serving/_farmhash.h"],
                include_dirs=[numpy.get_include()],
                extra_compile_args=["-O2", "-fvisibility=hidden"],
                optional=wanted != "1",
            )
        )
    except ImportError as exc:
        if wanted == "1":
            raise SystemExit(f"ADPREDICT_NATIVE=1 but numpy's headers are missing: {exc}") from exc
        print("adpredict: building without the wire decoder (numpy not installed)", file=sys.stderr)
    try:
        import pybind11

        cflags = _pkg_config("--cflags")
        libs = _pkg_config("--libs")
    except (ImportError, OSError, RuntimeError) as exc:
        if wanted == "1":
            raise SystemExit(
                f"ADPREDICT_NATIVE=1 but the native intake cannot be built: {exc}"
            ) from exc
        print(f"adpredict: building without the native intake ({exc})", file=sys.stderr)
        return extensions
    return [
        *extensions,
        Extension(
            "adpredict.serving._intake",
            ["src/adpredict/serving/_intake.cpp"],
            include_dirs=[pybind11.get_include()],
            extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", *cflags],
            extra_link_args=libs,
            language="c++",
            optional=wanted != "1",
        ),
    ]


setup(ext_modules=native_extensions())
