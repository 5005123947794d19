"""The jobs on a real multi-node Ray cluster on this machine, submitted with `ray job submit`,
reading and writing s3:// on a moto S3 server.

    python -m pytest tests/cluster/test_multinode.py -q

The cluster is two `ray start` nodes on 127.0.0.1 (a head and a worker, 3 logical CPUs each, a
custom resource each so their ids can be told apart), with Ray 2.60's token auth on and a token
of its own. The moto endpoint and credentials are in the standard AWS variables before `ray
start`, so every raylet, job driver and worker inherits them, as on a real deployment; the jobs
are submitted with the token and nothing else, so they read s3 only through that inheritance.

Placement is proven by resource arithmetic, not luck: a teacher actor (--cpus-per-actor 2) or a
training worker (--cpus-per-worker 2) leaves room for only one of its kind per 3-CPU node, so two
of them must run on two nodes; Ray's state API (what `ray list actors` shows) then names the
node ids they ran on.

Isolation from the rest of the suite and from other Ray users on this machine: each node has its
own --temp-dir under the cluster's root (so `ray.init()` elsewhere does not find it through
/tmp/ray/ray_current_cluster; one test's nodes share one on purpose), the cluster its own ports
and its own token file; RAY_ADDRESS is never set in this process. Teardown kills
exactly this cluster's processes (the sessions of our `ray start` commands plus anything whose
command line names our temp dir) and never runs `ray stop`: that matches processes by name and
would kill every Ray on the machine, including the suite's local Ray.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import s3fs

from pipeline.shards import SoftTargetRun
from tests.helpers import audio_corpus

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
SLOW_TEACHER = "tests.teacher_models:slow_audio_cnn?delay=1.5&width=8"  # audio_cnn, 1.5 s a batch
STUDENT = "pipeline.models.zoo:audio_cnn?width=4&depth=2"
NODE_CPUS = 3
SHARDS, PER_SHARD = 4, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[psutil.Process]) -> None:
    """SIGKILL these processes and wait (10 s at most) until they are gone."""
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


class LocalCluster:
    """A head and worker nodes started with `ray start` on this machine; `down()` kills them all."""

    def __init__(self, node_cpus: int = NODE_CPUS, shared_temp_dir: bool = False):
        self.node_cpus, self.shared_temp_dir = node_cpus, shared_temp_dir
        # Short root: Ray puts unix sockets under it (path limit ~107 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="kdc-", dir="/tmp"))
        token = self.root / "auth_token"
        self.token = secrets.token_hex(32)
        token.write_text(self.token)
        token.chmod(0o600)
        # This process's environment (the AWS variables included) minus any Ray settings a local
        # ray.init() in the same test session may have left in it.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
        # A node whose processes are gone is declared dead after 5 failed health checks: one a
        # second here instead of Ray's one every 3 s (a lost node is seen in ~5 s, not ~15 s).
        # A busy but live node still answers within the 10 s timeout of each check.
        self.env.update(RAY_health_check_period_ms="1000")
        # The nodes run from this interpreter's environment, as if its venv were activated: a job's
        # `python` entrypoint resolves through the nodes' PATH, and `make test` does not activate
        # the venv (on a fresh machine plain `python` has no torch).
        bindir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join([bindir, self.env.get("PATH", "")])
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.sessions: set[int] = set()
        self.nodes: dict[str, tuple[int, list[str]]] = {}  # name -> (session id, `ray start` args)
        self.logs: list[Path] = []
        self._down = False
        atexit.register(self.down)  # last resort if the fixture's teardown never runs

    def _ray_start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            # Its own session: every daemon it forks, and every worker the raylets spawn, stays in
            # it, so teardown can find them all (and nothing else) by session id.
            proc = subprocess.Popen([RAY, "start", *args], env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.sessions.add(proc.pid)
            self.nodes[name] = (proc.pid, args)
            rc = proc.wait(timeout=180)
        if rc != 0:
            raise RuntimeError(f"ray start ({name}) failed with {rc}:\n{log.read_text()[-3000:]}")

    def _common(self, name: str) -> list[str]:
        # Each node its own --temp-dir, as each machine of a real cluster has its own disk. Shared,
        # the nodes would share runtime_resources/: a worker node's runtime-env agent, creating a
        # job's working_dir there (it unpacks with overwrite), deletes and rewrites the directory
        # the job's driver on the head is importing from (ModuleNotFoundError mid-run, seen in CI).
        # (shared_temp_dir: that situation, as `ray start` twice on one machine gives by default.)
        temp = self.root / ("shared" if self.shared_temp_dir else name)
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.node_cpus), "--temp-dir", str(temp),
                "--object-store-memory", str(150 * 1024 * 1024), "--disable-usage-stats"]

    def start(self, workers: int = 1) -> None:
        self._ray_start("head", [
            "--head", "--port", str(self.gcs_port), "--resources", json.dumps({"kd_head": 1}),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
            *self._common("head")])
        for i in range(workers):
            self._ray_start(f"worker{i}", [
                "--address", f"127.0.0.1:{self.gcs_port}", "--resources", json.dumps({f"kd_worker{i}": 1}),
                "--dashboard-agent-listen-port", str(_free_port()), *self._common(f"w{i}")])
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                alive = [n for n in self.state("nodes") if n["state"] == "ALIVE"]
            except (OSError, KeyError, ValueError):  # dashboard not serving yet
                alive = []
            if len(alive) == 1 + workers:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not come up with {1 + workers} nodes")

    def alive(self) -> int:
        return len([n for n in self.state("nodes") if n["state"] == "ALIVE"])

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of one node (its raylet, agents and workers: the session of its
        `ray start`), as a machine that vanishes; returns how many processes were killed."""
        sid = self.nodes[name][0]
        procs = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == sid:
                    procs.append(p)
            except (OSError, psutil.Error):
                continue
        _kill(procs)
        return len(procs)

    def restart_node(self, name: str) -> None:
        """`ray start` the node again with the same arguments (a replacement machine joining)."""
        before = self.alive()
        self._ray_start(name, self.nodes[name][1])
        deadline = time.time() + 120
        while self.alive() <= before and time.time() < deadline:
            time.sleep(1)

    def submit_nowait(self, name: str, entrypoint: list[str]) -> str:
        """`ray job submit --no-wait`; returns the submission id."""
        sub_id = f"kd-{name}-{secrets.token_hex(3)}"
        self.ray("job", "submit", "--address", self.dashboard, "--working-dir", ".", "--submission-id", sub_id,
                 "--no-wait", "--", *entrypoint, timeout=120)
        return sub_id

    def wait_job(self, sub_id: str, timeout: float = 400) -> tuple[dict, str]:
        """(job info, logs) once the job has ended."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.api(f"/api/jobs/{sub_id}")
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info, self.api(f"/api/jobs/{sub_id}/logs")["logs"]
            time.sleep(1)
        logs = self.api(f"/api/jobs/{sub_id}/logs")["logs"]
        self.ray("job", "stop", "--address", self.dashboard, sub_id, check=False)
        raise AssertionError(f"job {sub_id} still running after {timeout} s:\n{logs[-6000:]}")

    def ray(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster (with its token), from the repository root."""
        return subprocess.run([RAY, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def api(self, path: str, token: str | None = None):
        """GET on the head's dashboard (jobs and state API) with the cluster's token, as the CLI does
        (``token``: another one; "" for none)."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(self.dashboard + path, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def state(self, kind: str) -> list[dict]:
        """Ray's state API (what `ray list KIND --detail` shows): nodes, actors, tasks, jobs."""
        return self.api(f"/api/v0/{kind}?limit=10000&detail=1")["data"]["result"]["result"]

    def submit(self, name: str, entrypoint: list[str], timeout: float = 400) -> tuple[dict, str]:
        """`ray job submit --working-dir .` (blocking); checks the job SUCCEEDED; returns (job info, logs)."""
        t0 = time.monotonic()
        sub_id = f"kd-{name}-{secrets.token_hex(3)}"
        try:
            r = self.ray("job", "submit", "--address", self.dashboard, "--working-dir", ".", "--submission-id",
                         sub_id, "--", *entrypoint, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            logs = self.api(f"/api/jobs/{sub_id}/logs")["logs"]
            self.ray("job", "stop", "--address", self.dashboard, sub_id, check=False)
            raise AssertionError(f"job {name} still running after {timeout} s:\n{logs[-6000:]}") from None
        info = self.api(f"/api/jobs/{sub_id}")
        logs = self.api(f"/api/jobs/{sub_id}/logs")["logs"]
        assert r.returncode == 0 and info["status"] == "SUCCEEDED", \
            f"job {name}: rc={r.returncode} {info['status']} {info.get('message')}\n{r.stderr[-2000:]}\n{logs[-6000:]}"
        print(f"[cluster] job {name} succeeded in {time.monotonic() - t0:.0f} s")
        return info, logs

    def _session_is_ours(self, sid: int) -> bool:
        """A session id of ours, and not a reused pid: Linux never reuses a pid while a live process
        has it as its session id, so if the leader (our `ray start`) is gone, members are ours."""
        try:
            return str(self.root) in " ".join(psutil.Process(sid).cmdline())
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def _processes(self) -> list[psutil.Process]:
        """This cluster's processes: those whose command line names our temp dir (GCS, raylets,
        dashboard, agents, workers), their descendants (the dashboard's forked modules), and any
        other member of the sessions of our `ray start` commands."""
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                mine = str(self.root) in " ".join(p.info["cmdline"] or [])
                if mine:
                    found.update({c.pid: c for c in p.children(recursive=True)})
                else:
                    sid = os.getsid(p.pid)
                    mine = sid in self.sessions and self._session_is_ours(sid)
            except (OSError, psutil.Error):
                continue
            if mine:
                found[p.pid] = p
        found.pop(os.getpid(), None)
        return list(found.values())

    def down(self) -> None:
        """Kill every process of this cluster (never `ray stop`, which kills every Ray on the machine)."""
        if self._down:
            return
        for _ in range(5):  # raylets may fork a worker while we kill; repeat until none is left
            procs = self._processes()
            if not procs:
                break
            _kill(procs)
        self._down = not self._processes()
        if self._down:
            shutil.rmtree(self.root, ignore_errors=True)


def _summary(logs: str) -> dict:
    return json.loads([ln for ln in logs.splitlines() if ln.startswith('{"summary"')][-1])["summary"]


def _nodes_of(actors: list[dict], job_id: str, class_part: str) -> list[str]:
    return [a["node_id"] for a in actors if a["job_id"] == job_id and class_part in a["class_name"]]


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """A 2-node Ray cluster; the AWS variables (set by s3_endpoint) are in its environment."""
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    c = LocalCluster()
    try:
        t0 = time.monotonic()
        c.start(workers=1)
        print(f"[cluster] 2 nodes up in {time.monotonic() - t0:.0f} s")
        yield c
    finally:
        c.down()
        assert c._down, f"cluster processes left: {[p.pid for p in c._processes()]}"


def test_jobs_on_a_multinode_cluster_with_s3(cluster, s3_bucket, tmp_path):
    c = cluster
    nodes = {n["node_id"]: n for n in c.state("nodes") if n["state"] == "ALIVE"}
    role = {nid: ("head" if "kd_head" in n["resources_total"] else "worker") for nid, n in nodes.items()}
    assert sorted(role.values()) == ["head", "worker"]
    # Our cluster is invisible to a plain ray.init() elsewhere on this machine.
    default_addr = Path("/tmp/ray/ray_current_cluster")
    assert not default_addr.exists() or default_addr.read_text().strip().rsplit(":", 1)[-1] != str(c.gcs_port)
    assert "RAY_ADDRESS" not in os.environ
    # Token auth is on: requests without the token, or with another one, are refused.
    for token, code in (("", 401), ("0" * 64, 403)):
        with pytest.raises(urllib.error.HTTPError) as e:
            c.api("/api/jobs/", token=token)
        assert e.value.code == code

    fs = s3fs.S3FileSystem()
    waves = audio_corpus(tmp_path / "pool", shards=SHARDS, per_shard=PER_SHARD, seed=71, labels=False)
    for p in sorted((tmp_path / "pool").iterdir()):
        fs.put_file(str(p), f"{s3_bucket}/corpus/{p.name}")
    base = f"s3://{s3_bucket}"

    # 1) pseudo-labelling: s3 in, s3 out; two teacher actors that cannot share a node. The job
    # does not wait for its whole actor pool, so the teacher takes 1.5 s a batch of one clip:
    # one actor alone would need ~24 s for the run, time for the second to start on the other node.
    info, logs = c.submit("pl", [
        "python", "jobs/pseudo_label.py", "--input", f"{base}/corpus/shard-{{0000..0003}}.tar",
        "--output", f"{base}/st", "--teacher", SLOW_TEACHER, "--trust-module", "tests.teacher_models",
        "--top-k", "5", "--batch-size", "1", "--actors", "2", "--cpus-per-actor", "2", "--progress-interval", "5"])
    s = _summary(logs)
    assert s["shards_done"] == SHARDS and s["samples"] == SHARDS * PER_SHARD and s["errors"] == 0
    assert "[kdpipe] warning" not in logs  # each node its own temp dir: nothing shared
    run = SoftTargetRun(f"{base}/st")
    assert sorted(run.shard_names) == [f"shard-{i:04d}" for i in range(SHARDS)]
    assert all(run.manifest.shards[n].input == f"{base}/corpus/{n}.tar" for n in run.shard_names)
    keys = [k for n in run.shard_names for k in run.read_table(n).column("key").to_pylist()]
    assert sorted(keys) == sorted(waves)
    listing = {p.split("/", 1)[1] for p in fs.find(f"{s3_bucket}/st")}
    assert {"st/manifest.json", *(f"st/shards/shard-{i:04d}.parquet" for i in range(SHARDS))} <= listing
    assert not [p for p in listing if ".tmp" in p]
    actors = c.state("actors")
    teacher_nodes = _nodes_of(actors, info["job_id"], "TeacherPredictor")
    assert len(teacher_nodes) >= 2 and set(teacher_nodes) == set(role), (teacher_nodes, role)
    # The soft-target files were written by workers on both nodes (the commit records say
    # where: one compactor pinned to each node, taking shards in turn); the driver got only
    # the records, a few hundred bytes a shard, never the shard files.
    compactors = _nodes_of(actors, info["job_id"], "Compactor")
    assert sorted(compactors) == sorted(role), (compactors, role)  # one per node
    writers = {rec.node for rec in run.manifest.shards.values()}
    assert writers == set(role), (writers, role)
    assert 0 < s["driver_bytes_received"] < s["bytes_written"], s
    assert not [p for p in listing if "/_parts/" in p]

    # 2) training: soft targets from s3, Ray Train storage (checkpoints) in s3, DDP over both nodes
    out = f"{base}/student"
    train = ["python", "jobs/train_student.py", "--soft-targets", f"{base}/st", "--student", STUDENT,
             "--output", out, "--epochs", "2", "--workers", "2", "--cpus-per-worker", "2", "--batch-size", "4"]
    info, logs = c.submit("train", train)
    s = _summary(logs)
    assert s["epochs"] == 2 and s["steps"] == 4  # 16 rows / 2 workers / batch 4 = 2 steps per epoch
    assert s["final"] == f"{out}/final" and f"{s3_bucket}/student/train/checkpoint_" in s["checkpoint"]
    keys = {p.split("/", 1)[1] for p in fs.find(f"{s3_bucket}/student")}
    ckpts = {k.split("/")[2] for k in keys if k.startswith("student/train/checkpoint_") and k.count("/") >= 3}
    assert len(ckpts) == 2 and all(f"student/train/{d}/train_state.pt" in keys for d in ckpts)
    assert {"student/final/model.safetensors", "student/final/config.json", "student/metrics.jsonl"} <= keys
    metrics = [json.loads(ln) for ln in fs.cat_file(f"{s3_bucket}/student/metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["step"] for m in metrics] == [2, 4]
    assert all(m["samples"] == SHARDS * PER_SHARD and m["kd"] is not None for m in metrics)
    actors = c.state("actors")
    worker_nodes = _nodes_of(actors, info["job_id"], "RayTrainWorker")
    assert len(worker_nodes) >= 2 and set(worker_nodes) == set(role), (worker_nodes, role)

    # 3) evaluation of final/ (in s3) against the soft-target run (in s3), result written to s3
    _, logs = c.submit("eval", ["python", "jobs/evaluate.py", "--checkpoint", f"{out}/final", "--input", f"{base}/st",
                                "--output", f"{base}/eval.json"])
    result = json.loads(fs.cat_file(f"{s3_bucket}/eval.json"))
    assert result == json.loads([ln for ln in logs.splitlines() if ln.startswith('{"checkpoint"')][-1])
    assert result["mode"] == "softtargets" and result["samples"] == SHARDS * PER_SHARD
    assert 0 <= result["agreement"] <= 1 and result["kl"] >= 0


def _wait_for(what: str, cond, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except Exception:  # not there yet (no manifest, no metrics)
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_node_lost_mid_run(cluster, s3_bucket, tmp_path):
    """The worker node's processes are killed mid pseudo-label and mid training; it comes back
    (a replacement machine) only after the loss has been seen."""
    c = cluster
    fs = s3fs.S3FileSystem()
    shards = 8
    waves = audio_corpus(tmp_path / "pool", shards=shards, per_shard=PER_SHARD, seed=72, labels=False)
    for p in sorted((tmp_path / "pool").iterdir()):
        fs.put_file(str(p), f"{s3_bucket}/corpus/{p.name}")
    base = f"s3://{s3_bucket}"
    pl = ["python", "jobs/pseudo_label.py", "--input", f"{base}/corpus", "--output", f"{base}/st",
          "--teacher", SLOW_TEACHER, "--trust-module", "tests.teacher_models", "--top-k", "5", "--batch-size", "1",
          "--actors", "2", "--cpus-per-actor", "2", "--progress-interval", "5"]

    # 1) pseudo-labelling: the worker node dies once a shard is committed
    sub = c.submit_nowait("pl-loss", pl)
    _wait_for("a committed shard", lambda: len(SoftTargetRun(f"{base}/st").shard_names) >= 1)
    killed = c.kill_node("worker0")
    committed = len(SoftTargetRun(f"{base}/st").shard_names)
    t_kill = time.monotonic()
    info, logs = c.wait_job(sub)
    print(f"[cluster] killed {killed} processes of worker0 with {committed}/{shards} shards committed; "
          f"pseudo-label {info['status']} {time.monotonic() - t_kill:.0f} s later")
    assert killed >= 3 and committed < shards  # the raylet, its agents, the workers; mid-run
    c.restart_node("worker0")
    if info["status"] != "SUCCEEDED":  # allowed: a clear failure, then a rerun that completes
        assert "[pseudo-label]" in logs.strip().splitlines()[-1], logs[-3000:]
        info, logs = c.submit("pl-rerun", pl)
    run = SoftTargetRun(f"{base}/st")
    keys = [k for n in run.shard_names for k in run.read_table(n).column("key").to_pylist()]
    assert sorted(keys) == sorted(waves)  # every key exactly once
    assert run.verify(deep=True) == {}

    # 2) training (DDP over both nodes; a student slowed to 1 s a step, so an epoch outlasts the
    # kill): the worker node dies after the first epoch's checkpoint and comes back 5 s later
    out = f"{base}/student"
    train = ["python", "jobs/train_student.py", "--soft-targets", f"{base}/st", "--output", out,
             "--student", "tests.teacher_models:slow_audio_cnn?delay=1.0&width=4&depth=2",
             "--trust-module", "tests.teacher_models", "--epochs", "3", "--workers", "2", "--cpus-per-worker", "2",
             "--batch-size", "4"]
    sub = c.submit_nowait("train-loss", train)
    _wait_for("epoch 1", lambda: fs.exists(f"{s3_bucket}/student/metrics.jsonl"))
    c.kill_node("worker0")
    epochs_at_kill = len(fs.cat_file(f"{s3_bucket}/student/metrics.jsonl").decode().splitlines())
    time.sleep(5)
    c.restart_node("worker0")
    info, logs = c.wait_job(sub, timeout=400)
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    assert epochs_at_kill < 3 and "[train] worker group failed" in logs, logs[-6000:]
    metrics = [json.loads(ln) for ln in fs.cat_file(f"{s3_bucket}/student/metrics.jsonl").decode().splitlines()]
    # resumed from the checkpoint: no finished epoch replayed, steps continue
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and [m["step"] for m in metrics] == [4, 8, 12]
    print(f"[cluster] student: worker0 killed after {epochs_at_kill} epoch(s); resumed, 3 epochs, each once")


def test_one_cpu_nodes_sharing_a_temp_dir(tmp_path):
    """Issue 23 item 1: `ray start` twice on one machine (1 CPU each, one temp dir, as by default).
    Each node's runtime-env agent unpacks the job's --working-dir into the shared
    runtime_resources/ with overwrite, so the second deletes and rewrites the directory the
    driver runs from, mid-run. The job said nothing and exited 1 at its cleanup (os.getcwd()
    of a deleted directory); now it warns, names the fix, and completes."""
    c = LocalCluster(node_cpus=1, shared_temp_dir=True)
    try:
        c.start(workers=1)
        waves = audio_corpus(tmp_path / "in", shards=4, per_shard=4, seed=29, labels=False)
        out = tmp_path / "st"
        info, logs = c.submit("pl-1cpu", [
            "python", "jobs/pseudo_label.py", "--input", str(tmp_path / "in"), "--output", str(out),
            "--teacher", "tests.teacher_models:slow_audio_cnn?delay=0.3&width=8", "--trust-module",
            "tests.teacher_models", "--batch-size", "2", "--progress-interval", "5"])
        # the hazard happened: both nodes' agents unpacked the working dir into the one directory
        agents = sorted((c.root / "shared").glob("session_latest/logs/runtime_env_agent*.log"))
        created = [f.read_text().count('Creating runtime env: {"working_dir"') for f in agents]
    finally:
        c.down()
    assert len(created) == 2 and all(created), (agents, created)
    assert ("[kdpipe] warning: 2 Ray nodes on host" in logs and "share the temp dir" in logs
            and "ray start --temp-dir" in logs), logs[-3000:]
    s = _summary(logs)
    assert s["shards_done"] == 4 and s["samples"] == 16 and s["errors"] == 0
    run = SoftTargetRun(str(out))
    keys = [k for n in run.shard_names for k in run.read_table(n).column("key").to_pylist()]
    assert sorted(keys) == sorted(waves)  # every key exactly once
    assert not (out / "_parts").exists()
