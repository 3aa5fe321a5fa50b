"""Real local object-store servers for tests and benchmarks: moto (S3) and gcp-storage-emulator (GCS).

Each server runs as a subprocess on a free port of 127.0.0.1, in its own
process group, logging to a file; :func:`start_moto` and :func:`start_gcs`
return once it answers HTTP.  Buckets are created through the servers' own
REST APIs (no SDK needed).  Nothing here leaves 127.0.0.1.

Pytest fixtures (import them into a test module to use them):

- ``s3_server`` / ``gcs_server``: one server per test session, stopped at the end;
- ``s3_root`` / ``gcs_root``: a fresh bucket per test and the environment
  pointing at it (``AWS_ENDPOINT_URL`` ... / ``STORAGE_EMULATOR_HOST``), set with
  ``monkeypatch``; the value is the ``s3://BUCKET/run`` / ``gs://BUCKET/run`` URL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

HOST = "127.0.0.1"
# Dummy credentials: moto accepts any unless told to check them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
_bucket_numbers = itertools.count()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server subprocess on 127.0.0.1.

    Attributes:
      name: "moto" or "gcs".
      url: ``http://127.0.0.1:PORT``.
      process: the subprocess.
      log: the file its output goes to.
    """

    name: str
    url: str
    process: subprocess.Popen
    log: str
    buckets: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def create_bucket(self, bucket: str) -> None:
        """Creates ``bucket`` through the server's REST API.

        Raises:
          urllib.error.HTTPError: when the server refuses.
        """
        if self.name == "moto":
            request = urllib.request.Request(f"{self.url}/{bucket}", method="PUT", data=b"")
        else:
            body = json.dumps({"name": bucket}).encode()
            request = urllib.request.Request(
                f"{self.url}/storage/v1/b?project=test",
                method="POST",
                data=body,
                headers={"Content-Type": "application/json"},
            )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        self.buckets.append(bucket)

    def stop(self) -> None:
        """Stops the server (SIGTERM to its process group, SIGKILL after 10 s)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _console_script(name: str) -> list[str]:
    """The command running an installed console script with this interpreter's environment."""
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    return [path]


def _start(
    name: str, command: list[str], url: str, ready_path: str, log: str, env: dict, timeout: float
) -> Server:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    server = Server(name, url, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + ready_path, timeout=2) as response:
                response.read()
                return server
        except urllib.error.HTTPError:
            return server  # it answers HTTP: up
        except OSError:
            time.sleep(0.1)
    server.stop()
    with open(log, errors="replace") as f:
        tail = f.read()[-2000:]
    raise RuntimeError(f"{name} did not start on {url} within {timeout:.0f} s; its log ends:\n{tail}")


def start_moto(log_dir: str, extra_env: dict[str, str] | None = None, timeout: float = 60.0) -> Server:
    """Starts ``moto_server`` (S3 and the rest of AWS) on a free port.

    Args:
      log_dir: where its log file goes.
      extra_env: more environment, e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}`` to check credentials.
      timeout: seconds to wait for it to answer.

    Returns:
      The running server.

    Raises:
      RuntimeError: when it does not answer within ``timeout`` (with its log's tail).
    """
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    log = os.path.join(log_dir, f"moto-{port}.log")
    command = _console_script("moto_server") + ["-H", HOST, "-p", str(port)]
    return _start("moto", command, f"http://{HOST}:{port}", "/", log, env, timeout)


def start_gcs(log_dir: str, timeout: float = 60.0) -> Server:
    """Starts ``gcp-storage-emulator`` (the GCS JSON API, in memory) on a free port.

    Raises:
      RuntimeError: when it does not answer within ``timeout`` (with its log's tail).
    """
    port = free_port()
    log = os.path.join(log_dir, f"gcs-{port}.log")
    command = _console_script("gcp-storage-emulator") + [
        "start",
        "--host",
        HOST,
        "--port",
        str(port),
        "--in-memory",
    ]
    return _start("gcs", command, f"http://{HOST}:{port}", "/storage/v1/b", log, dict(os.environ), timeout)


def new_bucket_name(prefix: str = "jckpt") -> str:
    """A bucket name unique in this process (lowercase, valid on S3 and GCS)."""
    return f"{prefix}-{os.getpid()}-{next(_bucket_numbers)}"


def s3_environment(endpoint: str) -> dict[str, str]:
    """The environment that points S3 clients (tensorstore, boto3) at ``endpoint``."""
    return {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}


# -- pytest fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_logs() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="jckpt-servers-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(server_logs: str) -> Iterator[Server]:
    server = start_moto(server_logs)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(server_logs: str) -> Iterator[Server]:
    server = start_gcs(server_logs)
    yield server
    server.stop()


@pytest.fixture
def s3_root(s3_server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://BUCKET/run`` in a fresh bucket, with the AWS environment pointing at moto."""
    bucket = new_bucket_name()
    s3_server.create_bucket(bucket)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment(s3_server.url).items():
        monkeypatch.setenv(name, value)
    return f"s3://{bucket}/run"


@pytest.fixture
def gcs_root(gcs_server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """``gs://BUCKET/run`` in a fresh bucket, with ``STORAGE_EMULATOR_HOST`` pointing at the emulator."""
    bucket = new_bucket_name()
    gcs_server.create_bucket(bucket)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"{HOST}:{gcs_server.port}")
    return f"gs://{bucket}/run"
