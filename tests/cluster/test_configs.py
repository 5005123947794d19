"""cluster/ (KubeRay manifests, the AWS cluster-launcher YAML, the Dockerfile) and the documented
`ray job submit` commands, checked against the code: there is no Kubernetes or AWS here, so the
files are parsed and every entrypoint is run through the job's own argument parser.

    python -m pytest tests/cluster/test_configs.py -q
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import DECODE_TASK_MEMORY
from pipeline.config import parse_args
from pipeline.student import evaluate as evaluate_job
from pipeline.student import job as student_job
from pipeline.teacher import job as teacher_job
from pipeline.teacher.plan import exec_plan

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # 3.10 (requires-python allows it): the few keys used here
    tomllib = None
_PYPROJECT_TEXT = (REPO / "pyproject.toml").read_text()
PYPROJECT = tomllib.loads(_PYPROJECT_TEXT) if tomllib else {"project": {
    "version": re.search(r'^version = "([^"]+)"', _PYPROJECT_TEXT, re.M).group(1),
    "requires-python": re.search(r'^requires-python = "([^"]+)"', _PYPROJECT_TEXT, re.M).group(1),
    "dependencies": re.findall(r'^\s+"(ray\[[^"]+)",', _PYPROJECT_TEXT, re.M)}}
PARSERS = {
    "jobs/pseudo_label.py": teacher_job.build_parser,
    "jobs/train_student.py": student_job.build_parser,
    "jobs/evaluate.py": evaluate_job.build_parser,
}
# vCPUs and GPUs of the AWS instance types a launcher config may use.
INSTANCES = {"p5.48xlarge": (192, 8), "p4d.24xlarge": (96, 8), "g5.xlarge": (4, 1), "g5.12xlarge": (48, 4),
             "g5.48xlarge": (192, 8), "g6e.12xlarge": (48, 4), "c7i.8xlarge": (32, 0), "c7i.16xlarge": (64, 0),
             "m7i.2xlarge": (8, 0)}
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
OBJECT_STORE_SHARE = 0.3  # Ray's default object store size: 30% of the node's memory, the rest is "memory"


def _ray_series() -> str:
    """'2.60' from pyproject's 'ray[...]==2.60.*'."""
    pin = next(d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray\[.*\]==", d))
    return re.search(r"==(\d+\.\d+)", pin).group(1)


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _rayjobs() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in sorted(CLUSTER.glob("rayjob-*.yaml"))]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [("raycluster.yaml", _load("raycluster.yaml")["spec"])]
    return specs + [(name, job["spec"]["rayClusterSpec"]) for name, job in _rayjobs()]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) for the head and every worker group of a RayCluster spec."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _container(group: dict) -> dict:
    (c,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    return c


def _quantity(q) -> float:
    """A Kubernetes quantity ('16', '500m', '32Gi', '1G') as a number (bytes for memory)."""
    q = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for u, f in units.items():
        if q.endswith(u):
            return float(q[: -len(u)]) * f
    return float(q)


def _pod(group: dict) -> dict:
    """What one pod of the group gives Ray: cpus, gpus, memory (limits), and the rayStartParams."""
    c = _container(group)
    lim = c["resources"]["limits"]
    params = group.get("rayStartParams", {})
    return {"cpus": float(params.get("num-cpus", _quantity(lim["cpu"]))),
            "gpus": float(params.get("num-gpus", 0)), "memory": _quantity(lim["memory"]),
            "replicas": int(group.get("replicas", 1)), "limits": lim, "requests": c["resources"].get("requests", {}),
            "params": params}


def _parse(tokens: list[str], where: str):
    """tokens = ['python', 'jobs/X.py', flags...] -> the job's parsed args (fails the test on any rejected flag)."""
    assert tokens[0] in ("python", "python3"), f"{where}: entrypoint must run python, got {tokens[0]!r}"
    script = tokens[1]
    assert (REPO / script).is_file(), f"{where}: {script} does not exist (relative to the working_dir, the repo root)"
    assert script in PARSERS, f"{where}: no parser known for {script}"
    parser = PARSERS[script]()
    parser.error = lambda msg: pytest.fail(f"{where}: {script} rejects its flags: {msg}\n  {shlex.join(tokens)}")
    return script, parse_args(parser, tokens[2:])


def _check_job_args(script: str, args, where: str) -> None:
    """The jobs' own flag checks that run before Ray starts (no I/O)."""
    try:
        if script == "jobs/pseudo_label.py":
            exec_plan(args)
        elif script == "jobs/train_student.py":
            student_job._validate(args)
    except Exception as e:  # ConfigError
        pytest.fail(f"{where}: {script}: {e}")


def _shell_argv(command: str, cwd: Path) -> list[str]:
    """The argv a POSIX shell (as `ray job` runs entrypoints) makes of ``command``."""
    r = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], cwd=cwd, capture_output=True, check=True)
    return r.stdout.decode().split("\0")[:-1]


# ---------------------------------------------------------------------------------------------


def test_files_parse_and_are_the_expected_kinds():
    assert _load("raycluster.yaml")["kind"] == "RayCluster"
    jobs = dict(_rayjobs())
    assert set(jobs) == {"rayjob-pseudo-label.yaml", "rayjob-train.yaml"}
    for name, doc in [("raycluster.yaml", _load("raycluster.yaml")), *jobs.items()]:
        assert doc["apiVersion"] == "ray.io/v1", name
    assert {j["spec"]["entrypoint"].split()[1] for j in jobs.values()} == {"jobs/pseudo_label.py",
                                                                          "jobs/train_student.py"}
    aws = _load("aws.yaml")
    assert aws["provider"]["type"] == "aws" and aws["head_node_type"] in aws["available_node_types"]
    assert "cluster/" in (CLUSTER / "README.md").read_text()


def test_images_and_ray_versions_match_pyproject():
    series, version = _ray_series(), PYPROJECT["project"]["version"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)", dockerfile, re.M).group(1)
    ray_version = base.split("-")[0]
    assert ray_version.startswith(series + "."), (base, series)
    py = re.search(r"-py(\d)(\d+)", base)
    lo = re.search(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert (int(py.group(1)), int(py.group(2))) >= (int(lo.group(1)), int(lo.group(2)))
    image = f"kdpipe:{version}-ray{ray_version}"
    assert image in dockerfile  # the build command at its top tags it so
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == ray_version, name
        for group_name, group in _groups(spec):
            assert _container(group)["image"].endswith("/" + image), (name, group_name)
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M).group(1)
    for name, job in _rayjobs():
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == workdir, name  # the checkout baked into the image
        assert not any(k in SECRET_ENV for k in env.get("env_vars", {})), name
    aws = _load("aws.yaml")
    setup = "\n".join(aws["setup_commands"])
    assert f"startswith('{series}.')" in setup


def test_token_auth_is_on_everywhere():
    for name, spec in _cluster_specs():
        assert spec["authOptions"]["mode"] == "token", name
    aws = _load("aws.yaml")
    for cmd in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert any(dst.endswith("/.ray/auth_token") for dst in aws["file_mounts"])


def test_no_inline_credentials():
    for name, spec in _cluster_specs():
        for group_name, group in _groups(spec):
            env = {e["name"]: e for e in _container(group).get("env", [])}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), (name, group_name)
            for key in SECRET_ENV:
                if key in env:
                    assert "value" not in env[key] and "secretKeyRef" in env[key]["valueFrom"], (name, key)
    for node_type, t in _load("aws.yaml")["available_node_types"].items():
        assert t["node_config"]["IamInstanceProfile"], node_type  # S3 through the instance profile
    for p in CLUSTER.iterdir():
        text = p.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), p.name
        assert not re.search(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{30,}", text), p.name


def test_gpu_limits_match_ray_start_params():
    for name, spec in _cluster_specs():
        head = _pod(spec["headGroupSpec"])
        assert head["params"]["num-cpus"] == "0", f"{name}: the head runs drivers only"
        kinds = set()
        for group_name, group in _groups(spec)[1:]:
            pod = _pod(group)
            gpu_limit = float(pod["limits"].get("nvidia.com/gpu", 0))
            assert gpu_limit == pod["gpus"], (name, group_name, gpu_limit, pod["gpus"])
            assert float(pod["requests"].get("nvidia.com/gpu", 0)) == gpu_limit, (name, group_name)
            assert pod["cpus"] <= _quantity(pod["limits"]["cpu"]), (name, group_name)
            assert pod["requests"]["cpu"] == pod["limits"]["cpu"], (name, group_name)  # Guaranteed QoS
            assert group.get("minReplicas", 0) <= pod["replicas"] <= group.get("maxReplicas", pod["replicas"])
            if gpu_limit:
                kinds.add("gpu")
                tol = group["template"]["spec"].get("tolerations", [])
                assert any(t["key"] == "nvidia.com/gpu" for t in tol), (name, group_name)
            else:
                kinds.add("cpu")
            # Every CPU can run a decode task: its memory reservation fits what Ray calls "memory".
            per_cpu = pod["memory"] * (1 - OBJECT_STORE_SHARE) / pod["cpus"]
            assert per_cpu >= DECODE_TASK_MEMORY, (name, group_name, per_cpu)
        assert kinds == {"gpu", "cpu"}, f"{name}: needs a GPU group and a CPU (decode) group"


def test_autoscaling_cluster_keeps_a_gpu_pod():
    # The jobs decide GPU vs CPU from the GPUs present when they start (--device auto falls back
    # to CPU, --device cuda refuses): an autoscaling GPU group must not go down to zero.
    spec = _load("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu = [g for _, g in _groups(spec)[1:] if _pod(g)["gpus"] > 0]
    assert gpu and all(g["minReplicas"] >= 1 for g in gpu)


def test_rayjob_entrypoints_are_accepted_and_fit_their_clusters(tmp_path):
    for name, job in _rayjobs():
        entry = job["spec"]["entrypoint"]
        tokens = shlex.split(entry)
        assert _shell_argv(entry, tmp_path) == tokens, f"{name}: the shell would change the arguments; quote them"
        script, args = _parse(tokens, name)
        _check_job_args(script, args, name)
        assert args.device == "cuda", name
        groups = [_pod(g) for _, g in _groups(job["spec"]["rayClusterSpec"])[1:]]
        gpu_pods = [p for p in groups for _ in range(p["replicas"]) if p["gpus"] > 0]
        all_cpus = sum(p["cpus"] * p["replicas"] for p in groups)
        if script == "jobs/pseudo_label.py":
            # One actor needs gpus_per_actor GPUs and cpus_per_actor CPUs on one pod.
            per_pod = [min(math.floor(p["gpus"] / args.gpus_per_actor + 1e-9),
                           math.floor(p["cpus"] / args.cpus_per_actor)) for p in gpu_pods]
            assert args.actors <= sum(per_pod), (name, args.actors, per_pod)
            assert args.actors * args.gpus_per_actor <= sum(p["gpus"] for p in gpu_pods)
            assert all_cpus - args.actors * args.cpus_per_actor >= 16, f"{name}: leave CPUs for decode tasks"
            assert str(args.output).startswith("s3://") and all(u.startswith("s3://") for u in args.input)
        else:
            # Ray Train: one GPU and cpus_per_worker CPUs per worker, each on one pod.
            per_pod = [min(math.floor(p["gpus"]), math.floor(p["cpus"] / args.cpus_per_worker)) for p in gpu_pods]
            assert args.workers <= sum(per_pod), (name, args.workers, per_pod)
            # The job's own start-up check: at least one CPU left for the data pipeline.
            assert args.workers * args.cpus_per_worker <= all_cpus - 1
            assert args.output.startswith("s3://") and args.soft_targets.startswith("s3://")
        assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] >= 1


def _documented_commands(path: Path) -> list[str]:
    """`python jobs/...` commands in fenced code blocks (after `ray job submit ... --` or alone)."""
    text = path.read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    out = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            m = re.search(r"(?:^|\s--\s+)(python3? jobs/\S+\.py.*)$", line.strip())
            if m:
                out.append(m.group(1))
    return out


@pytest.mark.parametrize("doc", ["cluster/README.md", "docs/scaling.md"])
def test_documented_commands_are_accepted(doc, tmp_path):
    commands = _documented_commands(REPO / doc)
    assert len(commands) >= 3, f"{doc}: expected documented job commands"
    for cmd in commands:
        tokens = shlex.split(cmd)
        assert _shell_argv(cmd, tmp_path) == tokens, f"{doc}: the shell would change: {cmd}"
        script, args = _parse(tokens, doc)
        _check_job_args(script, args, doc)


def test_aws_launcher_config():
    aws = _load("aws.yaml")
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "the head runs drivers only"
    workers = {n: t for n, t in types.items() if n != aws["head_node_type"]}
    gpu_types, cpu_types = [], []
    for name, t in workers.items():
        cfg = t["node_config"]
        vcpus, gpus = INSTANCES[cfg["InstanceType"]]
        assert t["resources"]["CPU"] == vcpus and t["resources"].get("GPU", 0) == gpus, name
        assert cfg["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        (gpu_types if gpus else cpu_types).append(name)
        # Decode tasks fit the memory Ray is told about.
        assert t["resources"].get("memory", math.inf) / vcpus >= DECODE_TASK_MEMORY, name
    assert gpu_types and cpu_types
    # The jobs decide GPU vs CPU from the GPUs present when they start: keep one GPU node up.
    assert any(workers[n]["min_workers"] >= 1 for n in gpu_types)
    assert all(workers[n]["min_workers"] == 0 for n in cpu_types)  # decode nodes only on demand
    assert sum(t["max_workers"] for t in workers.values()) <= aws["max_workers"]
    assert aws["provider"]["cache_stopped_nodes"] is False  # spot nodes are terminated, not stopped
    assert len({t["node_config"]["ImageId"] for t in types.values()}) == 1
    # The package is installed on every node from the checkout synced there.
    (checkout,) = [dst for dst, src in aws["file_mounts"].items() if src == "."]
    assert any(re.search(r"pip install .*-e " + re.escape(checkout.replace("/home/ubuntu", "~")), c)
               for c in aws["setup_commands"])
    assert any("--autoscaling-config" in c for c in aws["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in aws["worker_start_ray_commands"])
