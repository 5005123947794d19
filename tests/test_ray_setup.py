"""The checks kdpipe's drivers make on the Ray they join (pipeline.cli), against real Ray: the
suite's local one, and its own node records rearranged as a cluster's would read."""

from __future__ import annotations

import pytest

from pipeline.cli import check_cpu_room, shared_temp_dirs


def test_cpu_room_refused_on_local_ray_and_warned_on_a_cluster(ray_local, monkeypatch, capsys):
    """Actors or workers that take every CPU leave none for decoding: Ray would wait forever."""
    cpus = ray_local.cluster_resources()["CPU"]  # 4
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_cpu_room("pseudo-label", "--actors", int(cpus) - 1, "--cpus-per-actor", 1.0, None)  # one CPU left
    with pytest.raises(SystemExit) as e:
        check_cpu_room("pseudo-label", "--actors", int(cpus), "--cpus-per-actor", 1.0, None)
    assert str(e.value) == (f"--actors {int(cpus)} x --cpus-per-actor 1 leaves less than one of the cluster's "
                            f"{cpus:g} CPUs for decoding the data; lower --cpus-per-actor (e.g. 0.5) or --actors")
    check_cpu_room("train", "--workers", 2, "--cpus-per-worker", cpus, "ray://head:10001")  # may autoscale: a warning
    assert capsys.readouterr().out.startswith("[train] warning: --workers 2 x --cpus-per-worker 4 leaves less")


def test_nodes_sharing_a_temp_dir_are_named(ray_local):
    [node] = [n for n in ray_local.nodes() if n["Alive"]]
    assert shared_temp_dirs([node]) == []
    sockets = node["RayletSocketName"].rsplit("/", 1)[0]  # <temp>/session_*/sockets
    second = {**node, "NodeID": "f" * 56, "RayletSocketName": sockets + "/raylet.1"}  # `ray start` again, same dir
    [line] = shared_temp_dirs([node, second])
    temp = sockets.rsplit("/", 2)[0]
    assert line.startswith(f"2 Ray nodes on host {node['NodeManagerHostname']} ({node['NodeManagerAddress']}) "
                           f"share the temp dir {temp}: ") and line.endswith("`ray start --temp-dir DIR`")
    # another machine (its own disk), a dead node, another temp dir: none of them shares
    assert shared_temp_dirs([node, {**second, "NodeManagerHostname": "other", "NodeManagerAddress": "10.0.0.9"}]) == []
    assert shared_temp_dirs([node, {**second, "Alive": False}]) == []
    assert shared_temp_dirs([node, {**second, "RayletSocketName": "/tmp/ray-w1/session_x/sockets/raylet"}]) == []
