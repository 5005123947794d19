# python bench/benchlib.py pseudo-label MARKS.json -- ARGV...   (child mode, started by the benchmarks)
"""Shared pieces of bench/teacher_throughput.py and bench/student_throughput.py.

- synthetic corpora: FLAC clips (soundfile) and JPEG photos-sized images (PIL) in WebDataset
  tars, built from a small pool of distinct encoded samples repeated under distinct keys
  (decode cost is what matters, not distinctness; building 100k JPEGs would take longer
  than the benchmark itself);
- ``TreeSampler``: a background thread that samples RSS and CPU time of a process and all
  its descendants (the job driver, Ray's workers, Ray's own daemons) with psutil;
- ``run_job``: runs a kdpipe job in a child process (a fresh Ray each time), sampled by a
  TreeSampler, and returns its summary line, its output and the samples.

Child mode (``pseudo-label``) runs pipeline.teacher.job.run with a ShardTracker subclass that
also timestamps every record batch the driver receives, and writes the marks to MARKS.json.
Child mode ``ray-floor`` runs a no-op pipeline of a decode stage's shape (``ray_floor``): what
Ray itself costs a decode worker, outside and inside its tasks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------
# corpora


def audio_pool(n: int, seconds: tuple[float, float], sr: int = 16000, seed: int = 0) -> list[tuple[bytes, float]]:
    """n distinct FLAC clips (16-bit, mono, ``sr``): a few noisy tones each -> [(bytes, seconds)]."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dur = float(rng.uniform(*seconds))
        t = np.arange(int(dur * sr)) / sr
        wave = sum(0.15 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t + rng.uniform(0, 6)) for _ in range(3))
        wave = (wave + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, wave, sr, format="FLAC", subtype="PCM_16")
        out.append((buf.getvalue(), len(t) / sr))
    return out


def image_pool(n: int, size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0,
               progressive_every: int = 0) -> list[tuple[bytes, float]]:
    """n distinct JPEGs of ``size`` (w, h): smooth random colour fields plus mild noise, so they
    compress like photos (tens of KB at 500x375) -> [(bytes, 0.0)]; every
    ``progressive_every``-th one progressive (0: none)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        progressive = bool(progressive_every) and len(out) % progressive_every == progressive_every - 1
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, progressive=progressive)
        out.append((buf.getvalue(), 0.0))
    return out


@dataclass
class Corpus:
    root: str
    shards: list[str]
    samples: int
    audio_seconds: float
    bytes: int


def write_corpus(root: str, pool: list[tuple[bytes, float]], ext: str, shards: int, per_shard: int,
                 num_classes: int | None = None, seed: int = 0, prefix: str = "s",
                 frame_labels_ms: float | None = None, distinct: int | None = None) -> Corpus:
    """root/shard-XXXXX.tar, ``per_shard`` samples each, cycling through ``pool``.

    Keys are unique (``{prefix}{shard}-{i}``); with ``num_classes`` each sample also gets a
    random label, as a labeled corpus has: a ``.cls`` member, or with ``frame_labels_ms`` a
    ``.frames.npy`` member (int16, one label per frame_labels_ms of audio).

    ``distinct``: write only this many shard files and hard-link the rest to them (shard i ->
    file i % distinct): a GPU-sized corpus (600k images) without writing 30 GB. Keys repeat
    across linked shards, which is fine: shards are independent units everywhere in kdpipe.
    """
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, total_s, total_b, j = [], 0.0, 0, 0
    distinct = min(distinct or shards, shards)
    shard_s: list[float] = []
    for s in range(shards):
        path = os.path.join(root, f"shard-{s:05d}.tar")
        if s >= distinct:  # a hard link to an already written shard: same bytes, another name
            src = paths[s % distinct]
            try:
                os.link(src, path)
            except OSError:
                shutil.copyfile(src, path)
            total_s += shard_s[s % distinct]
            total_b += os.path.getsize(path)
            paths.append(path)
            continue
        before = total_s
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                data, secs = pool[j % len(pool)]
                j += 1
                total_s += secs
                members = {ext: data}
                if num_classes and frame_labels_ms:
                    frames = rng.integers(0, num_classes, int(np.ceil(secs * 1000 / frame_labels_ms))).astype(np.int16)
                    buf = io.BytesIO()
                    np.save(buf, frames)
                    members["frames.npy"] = buf.getvalue()
                elif num_classes:
                    members["cls"] = str(int(rng.integers(0, num_classes))).encode()
                for e, b in members.items():
                    info = tarfile.TarInfo(f"{prefix}{s:05d}-{i:05d}.{e}")
                    info.size = len(b)
                    tar.addfile(info, io.BytesIO(b))
        total_b += os.path.getsize(path)
        shard_s.append(total_s - before)
        paths.append(path)
    return Corpus(root, paths, shards * per_shard, total_s, total_b)


# --------------------------------------------------------------------------------------------
# process-tree sampling


def _role(cmdline: list[str], is_root: bool) -> str:
    """A process's role: "driver", "ray::NAME" for Ray workers (method suffix dropped), or
    "sys:NAME" for Ray's daemons (gcs_server, raylet, and Python ones by script name)."""
    if is_root:
        return "driver"
    head = cmdline[0] if cmdline else ""
    if head.startswith("ray::"):
        # "ray::MapWorker(MapBatches(TeacherPredictor)).submit" -> "ray::MapWorker(MapBatches(TeacherPredictor))"
        return head.split()[0].split(".")[0]
    base = os.path.basename(head)
    if base.startswith("python") and len(cmdline) > 1:
        script = next((a for a in cmdline[1:] if not a.startswith("-")), "")
        base = os.path.basename(script) or base
    return f"sys:{base}" if base else "sys:?"


@dataclass
class TreeStats:
    peak_driver_rss: int = 0
    peak_worker_rss: int = 0  # largest single Ray worker process
    peak_workers_rss_sum: int = 0  # all Ray workers at one instant (shared object-store pages counted per process)
    peak_worker_role: str = ""
    cpu_by_role: dict = field(default_factory=dict)  # seconds of user+system CPU over the whole run
    # the same, less what each process had used before it first ran that role (its start-up:
    # interpreter, imports), so that a role's CPU per item is its work's
    work_cpu_by_role: dict = field(default_factory=dict)
    series: list = field(default_factory=list)  # [(wall time, {role: cumulative CPU s}, probe value)] per sample
    samples: int = 0

    def cpu_between(self, t0: float, t1: float | None = None) -> dict[str, float]:
        """CPU seconds per role between wall times t0 and t1 (default: the last sample)."""
        if not self.series:
            return {}
        before = next((c for t, c, _ in reversed(self.series) if t <= t0), {})
        after = self.series[-1][1] if t1 is None else next((c for t, c, _ in reversed(self.series) if t <= t1), {})
        out = {r: after[r] - before.get(r, 0.0) for r in after}
        if "machine_busy" in out:  # CPU that processes outside this tree used meanwhile
            out["other processes (not ours)"] = out.pop("machine_busy") - sum(out.values())
        return dict(sorted(((r, v) for r, v in out.items() if v > 0.005), key=lambda kv: -kv[1]))


def import_psutil():
    """psutil, or the copy Ray ships in ray/thirdparty_files (machines with Ray but no psutil)."""
    try:
        import psutil
    except ImportError:
        import ray

        sys.path.append(os.path.join(os.path.dirname(ray.__file__), "thirdparty_files"))
        import psutil
    return psutil


class TreeSampler(threading.Thread):
    """Samples RSS and CPU time of ``pid`` and its descendants every ``interval`` s until stop().

    Ray worker processes are recognised by their process title ("ray::..."); an idle worker
    ("ray::IDLE") keeps the last real role it had, so a worker's CPU time lands under what it
    ran. A process that exits keeps its last sampled CPU time.
    """

    def __init__(self, pid: int, interval: float = 0.25, probe=None):
        """probe: optional callable; its value is recorded with every sample (e.g. epochs done)."""
        super().__init__(daemon=True)
        self.probe = probe
        self.psutil = psutil = import_psutil()
        self.root = psutil.Process(pid)
        self.interval = interval
        self._halt = threading.Event()
        self.stats = TreeStats()
        self._cpu: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        # a process's CPU when it was first seen in its current role (up to one sampling interval
        # late, so a few tenths of a second of each process's first work count as start-up)
        self._entry_cpu: dict[int, float] = {}
        self._done_work: dict[str, float] = {}  # work CPU of roles that processes have since left

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except ps.Error:
            return
        workers_sum = 0
        st = self.stats
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    ct = p.cpu_times()
                    cmd = p.cmdline()
            except ps.Error:
                continue
            role = _role(cmd, p.pid == self.root.pid)
            if (role not in ("ray::IDLE", "sys:?")) or p.pid not in self._roles:  # an exiting process loses its title
                prev = self._roles.get(p.pid)
                if prev != role:  # the work it did in its previous role stays that role's
                    if prev is not None:
                        self._done_work[prev] = (self._done_work.get(prev, 0.0)
                                                 + self._cpu.get(p.pid, 0.0) - self._entry_cpu.get(p.pid, 0.0))
                    self._entry_cpu[p.pid] = ct.user + ct.system
                self._roles[p.pid] = role
            self._cpu[p.pid] = ct.user + ct.system
            if role == "driver":
                st.peak_driver_rss = max(st.peak_driver_rss, rss)
            elif role.startswith("ray::"):
                workers_sum += rss
                if rss > st.peak_worker_rss:
                    st.peak_worker_rss, st.peak_worker_role = rss, self._roles[p.pid]
        st.peak_workers_rss_sum = max(st.peak_workers_rss_sum, workers_sum)
        st.samples += 1
        sys_t = ps.cpu_times()  # the whole machine: busy = all but idle and iowait
        cpu_all = {"machine_busy": sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)}
        value = None
        if self.probe is not None:
            try:
                value = self.probe()
            except Exception:  # a probe is a diagnostic; never stop sampling for it
                value = None
        st.series.append((time.time(), {**self._by_role(), **cpu_all}, value))

    def _by_role(self, work: bool = False) -> dict[str, float]:
        """CPU seconds per role; work=True: less each process's CPU before its current role,
        plus the work of roles processes have left."""
        cpu: dict[str, float] = dict(self._done_work) if work else {}
        for pid, secs in self._cpu.items():
            role = self._roles.get(pid, "?")
            cpu[role] = cpu.get(role, 0.0) + secs - (self._entry_cpu.get(pid, 0.0) if work else 0.0)
        return cpu

    def stop(self) -> TreeStats:
        self._halt.set()
        self.join()
        self.stats.cpu_by_role = dict(sorted(self._by_role().items(), key=lambda kv: -kv[1]))
        self.stats.work_cpu_by_role = dict(sorted(self._by_role(work=True).items(), key=lambda kv: -kv[1]))
        return self.stats


# --------------------------------------------------------------------------------------------
# child jobs


@dataclass
class JobResult:
    rc: int
    summary: dict | None
    output: str
    tree: TreeStats
    marks: dict | None
    wall: float
    timeline: str | None = None


def run_job(cmd: list[str], log_path: str, marks_path: str | None = None, sample_interval: float = 0.25,
            env: dict | None = None, probe=None) -> JobResult:
    """Run ``cmd`` (a kdpipe job) in a child process with its output in ``log_path``, sampled by
    a TreeSampler; parse the last ``{"summary": ...}`` line."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})})
        sampler = TreeSampler(proc.pid, sample_interval, probe)
        sampler.start()
        rc = proc.wait()
    tree = sampler.stop()
    wall = time.monotonic() - t0
    with open(log_path) as f:
        output = f.read()
    summary = None
    for line in output.splitlines():
        if line.startswith('{"summary"'):
            summary = json.loads(line)["summary"]
    marks = None
    if marks_path and os.path.exists(marks_path):
        with open(marks_path) as f:
            marks = json.load(f)
    return JobResult(rc, summary, output, tree, marks, wall)


def pseudo_label_cmd(marks_path: str, argv: list[str]) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "pseudo-label", marks_path, "--", *argv]


def steady_rate(marks: dict | None) -> tuple[float | None, float | None]:
    """(seconds from pipeline start to the first result batch, samples/s after it) from the marks."""
    if not marks or not marks.get("batches"):
        return None, None
    b = marks["batches"]  # [[t, samples], ...] relative to the pipeline start
    first = b[0][0]
    if len(b) < 3 or b[-1][0] - first <= 0:
        return first, None
    return first, sum(n for _, n in b[1:]) / (b[-1][0] - first)


def timeline_summary(timeline_path: str, start_wall: float) -> list[tuple[str, float, float]]:
    """Key moments of a pseudo-label run from Ray's timeline: [(what, start s, end s)] relative to
    the pipeline start (the summary's clock). Spans are Ray's own task events; decode tasks are
    Ray Data's ``_map_task``, the teacher actor's calls are ``submit`` on the actor's worker."""
    with open(timeline_path) as f:
        events = [e for e in json.load(f) if e.get("ph") == "X"]
    rel = lambda us: us / 1e6 - start_wall  # noqa: E731

    def span(name: str, pred=lambda e: True):
        ev = [e for e in events if e["name"] == name and pred(e)]
        if not ev:
            return None
        return (min(rel(e["ts"]) for e in ev), max(rel(e["ts"] + e["dur"]) for e in ev),
                sum(e["dur"] for e in ev) / 1e6, len(ev))

    out = []
    teacher_workers = {e["tid"] for e in events if e["name"] == "submit"}
    for label, name, pred in (
        ("dataset registered", "register_dataset", lambda e: True),
        ("teacher actor __init__", "__init__", lambda e: e["tid"] in teacher_workers),
        ("decode tasks (_map_task)", "ray.data._internal.execution.operators.map_operator._map_task", lambda e: True),
        ("teacher calls (submit)", "submit", lambda e: True),
    ):
        s = span(name, pred)
        if s:
            out.append((label, *s))
    return out


def _child_pseudo_label(marks_path: str, argv: list[str]) -> int:
    """pipeline.teacher.job.run(argv) with every record batch's arrival time recorded (through
    the job's own seam: ``on_records``)."""
    import pipeline.teacher.job as job
    from pipeline.teacher.accounting import Record

    batches: list[list[float]] = []
    start: list[float] = []
    seen: list = []

    def timed(records, tracker):
        now = time.monotonic()
        if not start:
            start.append(tracker.progress.start)  # set by progress.restart() when the pipeline starts
            start.append(time.time() - (now - tracker.progress.start))  # the same instant, wall clock
            seen.append(tracker)
        kinds = records.column("kind").to_pylist()
        rows = sum(r for r, k in zip(records.column("rows").to_pylist(), kinds) if k == Record.PART)
        batches.append([now - start[0], rows])

    rc = job.run(argv, on_records=timed)
    stats = ""
    if seen and seen[0].dataset is not None:
        try:
            stats = seen[0].dataset.stats()
        except Exception as e:  # stats are a diagnostic; never fail the run for them
            stats = f"(no stats: {type(e).__name__}: {e})"
    timeline = os.environ.get("KDPIPE_BENCH_TIMELINE")
    if timeline:  # Ray's chrome://tracing timeline of every task and actor call
        import ray

        ray.timeline(filename=timeline)
    with open(marks_path, "w") as f:
        json.dump({"batches": batches, "ray_data_stats": stats, "pipeline_start_wall": start[1] if start else None}, f)
    return rc


class NoopShards:
    """Ray Data UDF for ``ray_floor``: a batch of shard rows -> per shard, one table of ``rows``
    rows whose payload column has ``row_bytes`` bytes a row, as the decode stage emits, made
    without reading or decoding anything."""

    def __init__(self, rows: int, row_bytes: int):
        self.rows, self.row_bytes = rows, row_bytes

    def __call__(self, batch: dict):
        import pyarrow as pa

        for _ in batch["name"]:
            offsets = np.arange(self.rows + 1, dtype=np.int64) * self.row_bytes
            values = pa.array(np.zeros(self.rows * self.row_bytes, np.uint8))
            yield pa.table({"payload": pa.LargeListArray.from_arrays(pa.array(offsets), values)})


class _CountRows:
    def __call__(self, batch):
        import pyarrow as pa

        return pa.table({"n": [batch.num_rows]})


def _child_ray_floor(marks_path: str, shards: int, rows: int, row_bytes: int) -> int:
    """Ray's own cost of a decode stage of this shape: the job's Ray start-up and Data settings,
    ``shards`` shard rows grouped into tasks as the job groups them, each shard a table of
    ``rows`` x ``row_bytes`` made from nothing, into one actor that counts rows."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.cli import DECODE_TASK_MEMORY, init_ray
    from pipeline.teacher.job import shards_per_decode_task

    init_ray(None)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.memory_usage_poll_interval_s = None
    group = shards_per_decode_task([rows * row_bytes] * shards, ray.cluster_resources().get("CPU", 1))
    start = time.time()
    ds = ray.data.from_items([{"name": f"s{i}"} for i in range(shards)], override_num_blocks=shards)
    ds = ds.map_batches(NoopShards(rows, row_bytes), batch_size=group, num_cpus=1, memory=DECODE_TASK_MEMORY)
    ds = ds.map_batches(_CountRows, batch_size=None, batch_format="pyarrow", compute=ActorPoolStrategy(size=1))
    n = sum(int(b["n"].sum()) for b in ds.iter_batches(batch_size=None))
    with open(marks_path, "w") as f:
        json.dump({"pipeline_start_wall": start, "rows": n, "ray_data_stats": ds.stats()}, f)
    return 0


def ray_floor(work: str, shards: int, rows: int, row_bytes: int) -> dict:
    """Run ``_child_ray_floor`` in a child process with a fresh Ray; returns the CPU its
    shard-task worker processes used in the window, per row (ms), and that of the tasks alone."""
    marks = os.path.join(work, "ray-floor.json")
    cmd = [sys.executable, os.path.abspath(__file__), "ray-floor", marks, str(shards), str(rows), str(row_bytes)]
    res = run_job(cmd, os.path.join(work, "ray-floor.log"), marks)
    if res.rc != 0 or not res.marks:
        raise SystemExit(f"ray floor run failed (exit {res.rc}): {res.output[-3000:]}")
    window = res.tree.cpu_between(res.marks["pipeline_start_wall"])
    workers = sum(v for r, v in window.items() if "NoopShards" in r)
    n = res.marks["rows"]
    import re

    stats = res.marks["ray_data_stats"]
    i = stats.find("(NoopShards)")
    mt = re.search(r"Remote cpu time:.*?([\d.]+)(us|ms|s) total", stats[i:]) if i >= 0 else None
    tasks = float(mt.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[mt.group(2)] if mt else 0.0
    return {"rows": n, "worker_ms_per_row": 1e3 * workers / n, "task_ms_per_row": 1e3 * tasks / n,
            "outside_tasks_ms_per_row": 1e3 * (workers - tasks) / n}


def mib(n: int | float) -> str:
    return f"{n / 2**20:,.0f} MiB"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "pseudo-label":
        rest = sys.argv[3:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        sys.path.insert(0, REPO)
        sys.exit(_child_pseudo_label(sys.argv[2], rest))
    if len(sys.argv) == 6 and sys.argv[1] == "ray-floor":
        sys.path.insert(0, REPO)
        sys.exit(_child_ray_floor(sys.argv[2], *map(int, sys.argv[3:])))
    print(__doc__)
    sys.exit(2)
