"""Session fixtures: a moto S3 server on 127.0.0.1 behind a fault-injecting proxy, and one
local Ray for the whole suite.

The S3 server and its proxy (tests/s3_faults.py: it forwards everything until a test turns
faults on through ``s3_faults``) start first, and the proxy's endpoint and the credentials go
into the standard AWS environment variables before Ray starts, so Ray's workers inherit them
exactly as they would inherit a real deployment's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, procs: list) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    for p in procs:
        p.kill()
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, reached through the fault proxy (faults off
    unless a test turns them on); yields the endpoint URL everyone uses (the proxy's)."""
    port, proxy_port = _free_port(), _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_port(port, [moto])
    proxy = subprocess.Popen([sys.executable, "-m", "tests.s3_faults", "--upstream", f"http://127.0.0.1:{port}",
                              "--port", str(proxy_port)], cwd=REPO, stdout=subprocess.DEVNULL)
    _wait_for_port(proxy_port, [moto, proxy])
    endpoint = f"http://127.0.0.1:{proxy_port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for p in (proxy, moto):
        p.kill()
        p.wait()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the suite (4 logical CPUs on this 2-core machine, so training workers
    and data tasks can be scheduled side by side, as on a real node with more cores)."""
    import ray

    if not ray.is_initialized():
        from pipeline.cli import embedded_runtime_env

        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", runtime_env=embedded_runtime_env())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; yields its name."""
    import s3fs

    name = "kdpipe-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs = s3fs.S3FileSystem()
    if not fs.exists(name):
        fs.mkdir(name)
    yield name


@pytest.fixture
def s3_faults(s3_endpoint):
    """The fault proxy's control (tests/s3_faults.py FaultControl); faults are off again after the test."""
    from tests.s3_faults import FaultControl

    control = FaultControl(s3_endpoint)
    yield control
    control.set(0.0)
