"""Command-line pieces shared by the jobs: preprocessing flags, Ray start-up."""

from __future__ import annotations

import argparse
import os

from pipeline.config import ConfigError
from pipeline.modalities import DEFAULT_LIMITS, DecodeLimits, preprocessing_from_dict

AUDIO_FLAGS = {"sample_rate": "sample_rate", "features": "features", "n_mels": "n_mels", "win_ms": "win_ms",
               "hop_ms": "hop_ms", "chunk_seconds": "chunk_seconds", "crop_seconds": "crop_seconds"}
# Memory reserved per CPU decode task (a length bucket of decoded audio). Being set on decode
# and not on model actors, it also keeps Ray Data from fusing the two operators.
DECODE_TASK_MEMORY = 512 * 1024 * 1024
IMAGE_FLAGS = {"image_resize": "resize", "image_crop": "crop", "image_mean": "mean", "image_std": "std",
               "image_resize_mode": "resize_mode", "image_resample": "resample", "image_crop_offset": "crop_offset",
               "image_backend": "backend"}


def add_preprocessing_flags(p: argparse.ArgumentParser, source: str = "the teacher checkpoint's") -> None:
    g = p.add_argument_group(f"audio preprocessing (default: {source}, else these)")
    g.add_argument("--sample-rate", type=int, default=None, help="resample to this rate (Hz) [16000]")
    g.add_argument("--features", choices=["logmel", "fbank", "none"], default=None, help="model input features [logmel]")
    g.add_argument("--n-mels", type=int, default=None, help="mel bins [40]")
    g.add_argument("--win-ms", type=float, default=None, help="feature window in ms [25]")
    g.add_argument("--hop-ms", type=float, default=None, help="feature hop in ms [10]")
    g.add_argument("--chunk-seconds", type=float, default=None,
                   help="split longer recordings into windows of this length; keys become KEY@START-END (samples)")
    g.add_argument("--crop-seconds", type=float, default=None, help="centre-crop/zero-pad each clip to this length")
    g = p.add_argument_group(f"image preprocessing (default: {source}, else these)")
    g.add_argument("--image-resize", type=int, default=None, help="resize the shorter side to this [32]")
    g.add_argument("--image-crop", type=int, default=None, help="centre crop size [32]")
    g.add_argument("--image-mean", type=float, nargs=3, default=None, help="per-channel mean [0.5 0.5 0.5]")
    g.add_argument("--image-std", type=float, nargs=3, default=None, help="per-channel std [0.5 0.5 0.5]")
    g.add_argument("--image-resize-mode", choices=["shorter", "shortest_edge", "exact"], default=None,
                   help="shorter: shorter side to --image-resize (longer side rounded); shortest_edge: the same with "
                        "the longer side truncated (torchvision, Hugging Face); exact: both sides [shorter]")
    g.add_argument("--image-resample", choices=["nearest", "nearest-exact", "bilinear", "bicubic", "lanczos", "box",
                                                "hamming"], default=None, help="resize filter [bilinear]")
    g.add_argument("--image-crop-offset", choices=["floor", "round"], default=None,
                   help="centre-crop corner for odd margins: floor (Hugging Face) or round (torchvision CenterCrop) [floor]")
    g.add_argument("--image-backend", choices=["pil", "torchvision-v2", "torchvision-v1"], default=None,
                   help="resize implementation: PIL, or torchvision on uint8 tensors (v2: Hugging Face processors; "
                        "v1: torchvision weights.transforms() on tensors) [pil]")


def _prep_overrides(args) -> dict:
    out = {}
    for flag, field in {**AUDIO_FLAGS, **IMAGE_FLAGS}.items():
        v = getattr(args, flag, None)
        if v is not None:
            out[field] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def resolve_preprocessing(modality: str, from_model: dict | None, args) -> dict:
    """``from_model``'s preprocessing (a checkpoint's or a manifest's; else the defaults), explicit flags on top."""
    base = dict(from_model) if from_model else {}
    base["modality"] = modality
    # Where a cache's images were decoded is the pseudo-label job's own choice (--image-decode,
    # set after this); students and evaluation decode on the CPU whatever the cache did.
    base.pop("decode", None)
    flags = _prep_overrides(args)
    fields = set(AUDIO_FLAGS.values()) if modality == "audio" else set(IMAGE_FLAGS.values())
    wrong = {k for k in flags if k not in fields}
    if wrong:
        names = [f for f, v in {**AUDIO_FLAGS, **IMAGE_FLAGS}.items() if v in wrong]
        raise ConfigError(f"flag(s) {', '.join('--' + n.replace('_', '-') for n in names)} do not apply to {modality} inputs")
    base.update(flags)
    try:
        return preprocessing_from_dict(base).to_dict()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"preprocessing: {e}") from None


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-module", action="append", default=None, metavar="MODULE",
                   help="a Python module (or package) whose model factories checkpoints may name; repeatable. "
                        "Without it a checkpoint can only name kdpipe's own factories (docs/recipes.md, Security)")


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """Flags that bound what one sample may make a decode task allocate (DecodeLimits)."""
    g = p.add_argument_group("input limits (larger samples are quarantined, not decoded)")
    g.add_argument("--max-image-pixels", type=int, default=DEFAULT_LIMITS.max_image_pixels,
                   help="largest width x height an image header may declare (RGB costs 3 bytes a pixel)")
    g.add_argument("--max-audio-seconds", type=float, default=DEFAULT_LIMITS.max_audio_seconds,
                   help="longest recording decoded (at its own rate; raise it for long recordings with --chunk-seconds)")
    g.add_argument("--max-member-mb", type=float, default=DEFAULT_LIMITS.max_member_bytes / 2**20,
                   help="largest tar member read into memory, in MiB")


def limits_from_args(args) -> DecodeLimits:
    try:
        return DecodeLimits(max_image_pixels=args.max_image_pixels, max_audio_seconds=args.max_audio_seconds,
                            max_member_bytes=int(args.max_member_mb * 2**20))
    except ValueError:
        raise ConfigError("--max-image-pixels, --max-audio-seconds and --max-member-mb must be > 0") from None


def use_gpu(device: str) -> bool:
    """Whether the job's GPU work goes to GPUs (call after init_ray): --device cuda always
    (an autoscaling GPU group may still be starting), auto when the cluster has GPUs now."""
    import ray

    if device == "cpu":
        return False
    return device == "cuda" or ray.cluster_resources().get("GPU", 0) > 0


def add_ray_flags(p) -> None:
    """--address and --dashboard (on a parser or an argument group)."""
    p.add_argument("--address", default=None,
                   help="Ray cluster address; default: $RAY_ADDRESS (set by ray job submit), else an embedded local Ray")
    p.add_argument("--dashboard", action="store_true",
                   help="embedded local Ray only: start it with its dashboard (http://127.0.0.1:8265), metrics and "
                        "worker logs streamed to this console; off by default, as they cost a laptop about a tenth "
                        "of its CPU (docs/performance.md); worker logs are in /tmp/ray/session_latest/logs either way")


def init_ray(address: str | None, dashboard: bool = False) -> None:
    """Connect to --address / $RAY_ADDRESS, else start an embedded local Ray (once per process).

    The embedded Ray starts lean unless ``dashboard``: no dashboard, no metrics collection, no
    worker logs streamed to the driver. On 2 cores those took ~10 % of a pipeline's throughput
    (docs/performance.md); the job prints its own progress, and a worker's failure still
    reaches the driver as an exception. A cluster's settings are the cluster's."""
    import logging

    import ray

    # The jobs print their own progress; Ray Data's per-dataset INFO lines would drown it.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        if ray.get_runtime_context().runtime_env.get("working_dir"):
            for line in shared_temp_dirs(ray.nodes()):
                print(f"[kdpipe] warning: {line}", flush=True)
        return
    ray.init(logging_level="WARNING", include_dashboard=dashboard, log_to_driver=dashboard,
             _system_config=None if dashboard else {"enable_metrics_collection": False},
             runtime_env=embedded_runtime_env())


def embedded_runtime_env() -> dict:
    """The runtime_env of an embedded local Ray: workers import the same pipeline/ as the driver
    (jobs/ scripts are not a package), and Ray Train starts no PreemptionWatcher actor. It
    watches for nodes being drained (spot preemption) and a single local node is never drained;
    it cost each training job one more process start (~1.5 s of CPU on 2 cores)."""
    return {"env_vars": {"PYTHONPATH": _repo_root_pythonpath(), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}


def check_cpu_room(job: str, count_flag: str, count: int, per_flag: str, per: float, address: str | None) -> None:
    """Refuse (embedded Ray) or warn (a cluster, which may autoscale) when ``count`` actors or
    workers of ``per`` CPUs each leave less than one of the cluster's CPUs for the decode tasks
    that feed them: Ray would wait for a CPU forever, silently. Call after ``init_ray``."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if count * per <= cpus - 1:
        return
    msg = (f"{count_flag} {count} x {per_flag} {per:g} leaves less than one of the cluster's {cpus:g} CPUs for "
           f"decoding the data; lower {per_flag} (e.g. 0.5) or {count_flag}")
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise SystemExit(msg)  # a fixed local Ray would wait forever
    print(f"[{job}] warning: {msg}, unless the cluster autoscales", flush=True)


def shared_temp_dirs(nodes: list[dict]) -> list[str]:
    """One line per group of alive Ray nodes that run on one host from one temp dir (``ray
    start`` twice on a machine without ``--temp-dir``); ``nodes``: ``ray.nodes()``.

    Such nodes share runtime_resources/, and each node's runtime-env agent unpacks a job's
    --working-dir there with overwrite: the second node's unpack deletes and rewrites the
    directory the job's driver and the first node's workers run from, mid-run (a lost current
    directory, modules that vanish for a moment). Machines of a real cluster have their own disks."""
    groups: dict[tuple, list[str]] = {}
    for n in nodes:
        if n.get("Alive"):
            session = os.path.dirname(os.path.dirname(n.get("RayletSocketName", "")))  # <temp>/session_*/sockets/raylet
            groups.setdefault((n.get("NodeManagerHostname"), n.get("NodeManagerAddress"), session), []).append(n["NodeID"])
    return [f"{len(ids)} Ray nodes on host {host} ({addr}) share the temp dir {os.path.dirname(session)}: each unpacks "
            f"the job's --working-dir into {session}/runtime_resources over the copy the others run from; start "
            "each node with its own `ray start --temp-dir DIR`"
            for (host, addr, session), ids in sorted(groups.items()) if session and len(ids) > 1]


def _repo_root_pythonpath() -> str:
    """This repository's root, before any PYTHONPATH already set."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)



