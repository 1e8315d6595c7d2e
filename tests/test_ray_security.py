"""The local Ray instance of a stage: loopback only, and no work accepted without the token.

Both tests run Ray in subprocesses with a user's environment (no `RAY_AUTH_MODE`, which only
this suite's own instance sets) and a temporary home, where Ray keeps the token it generates.
"""
from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.data.synthetic import write_shards

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("concept-atlas"))


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment a user runs commands in: token auth as Ray defaults it, `home` as HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", **extra)
    return env


def listening_sockets(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening in `root`'s process tree."""
    found = []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns
                  if c.status == psutil.CONN_LISTEN]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # a dual-stack socket bound to ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def run_watched(args: list[str], env: dict[str, str]) -> tuple[str, set[tuple[str, str, int]]]:
    """Run a CLI command; its output and every socket its process tree listened on."""
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(driver.pid)
    seen: set[tuple[str, str, int]] = set()
    deadline = time.time() + 300
    while driver.poll() is None and time.time() < deadline:
        seen.update(listening_sockets(root))
        time.sleep(0.1)
    output = driver.communicate(timeout=60)[0]
    assert driver.returncode == 0, output[-3000:]
    return output, seen


def test_stages_on_ray_listen_on_loopback_only(tmp_path) -> None:
    """extract (model actors) and train-sae (two DDP workers) as a user runs them."""
    shards = tmp_path / "shards"
    write_shards(shards, n=48, seed=0, size=64, shard_size=8, workers=1, progress=False)
    home, out = tmp_path / "home", str(tmp_path / "out")
    home.mkdir()
    extract = [CLI, "extract", "--shards", str(shards), "--model", "demo_resnet", "--weights",
               "none", "--layers", "layer2", "--out", out, "--actors", "1",
               "--cpus-per-actor", "1", "--no-progress"]
    train = [CLI, "train-sae", "--out", out, "--layers", "layer2", "--n-latents", "64", "--k",
             "4", "--batch-size", "64", "--steps", "10", "--checkpoint-every", "10",
             "--workers", "2", "--cpus-per-worker", "0.5"]  # a CPU left for reads
    for args, worker in ((extract, "ray::WorkerActor"), (train, "ray::RayTrainWorker")):
        output, seen = run_watched(args, user_env(home))
        names = {name for name, _, _ in seen}
        # the check must have seen the instance at work: GCS, raylet, the stage's workers
        assert {"gcs_server", "raylet"} <= names, (args[1], sorted(seen))
        assert any(name.startswith(worker) for name in names), (args[1], sorted(seen))
        exposed = sorted(s for s in seen if not is_loopback(s[1]))
        assert not exposed, f"{args[1]} listened beyond loopback: {exposed}"
        # and said nothing alarming that is not an error of ours: no error-level line of Ray's
        # C++ core (Ray Train's preemption watcher printed one into every local train-sae)
        ray_errors = re.findall(r"^\[[\d-]+ [\d:,]+ E \d+ \d+\].*$", output, flags=re.M)
        assert not ray_errors, f"{args[1]}: {ray_errors}"
    # token authentication was on: Ray generated the user's token
    assert (home / ".ray" / "auth_token").is_file()


SERVER = """
import sys
from jobs.cluster import start_local_ray
print(start_local_ray(num_cpus=1), flush=True)
sys.stdin.read()  # serve until the test closes stdin
"""

CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote
def write(path):
    with open(path, "w") as f:
        f.write("ran inside the instance")
print(ray.get(write.remote(sys.argv[2]), timeout=60))
"""


def test_a_client_without_the_token_cannot_submit_work(tmp_path) -> None:
    server_home, client_home = tmp_path / "server", tmp_path / "client"
    server_home.mkdir()
    client_home.mkdir()
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=REPO, env=user_env(server_home),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        gcs = server.stdout.readline().strip()
        assert gcs.startswith("127.0.0.1:"), gcs
        # clients on this host (an off-host client cannot reach a loopback socket at all); the
        # switch makes Ray dial 127.0.0.1 instead of rewriting it to the machine's address
        loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        clients = {
            "no token": user_env(client_home, RAY_AUTH_MODE="disabled", **loopback),
            "wrong token": user_env(client_home, RAY_AUTH_MODE="token",
                                    RAY_AUTH_TOKEN="0" * 32, **loopback),
            "the token": user_env(server_home, RAY_AUTH_MODE="token", **loopback),
        }
        procs = {name: subprocess.Popen(
            [sys.executable, "-c", CLIENT, gcs, str(tmp_path / name.replace(" ", "_"))],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, env in clients.items()}
        results = {name: (p.wait(timeout=180), p.stderr.read()) for name, p in procs.items()}
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    # the control: with the token, the same client runs its task, so the probe can succeed
    assert results["the token"][0] == 0, results["the token"][1][-2000:]
    assert (tmp_path / "the_token").is_file()
    for name in ("no token", "wrong token"):
        code, err = results[name]
        assert code != 0 and not (tmp_path / name.replace(" ", "_")).exists(), name
        assert "InvalidAuthToken" in err, err[-2000:]
