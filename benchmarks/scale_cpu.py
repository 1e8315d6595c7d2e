"""Synthetic CPU scaling run: every stage of a small build at growing image counts, each stage
in its own process, its CPU seconds, wall seconds and peak memory (max RSS), and the size of
every table it leaves.

    python benchmarks/scale_cpu.py --sizes 1000 2000 4000 --out benchmarks/results/scale_cpu.json

Sizes already in `--out` are kept, so a later run with other `--sizes` extends the table.

Each size is a fresh build of `configs/demo.yaml` with `data.synthetic.n` set to the size and
every stage in process (no Ray: one process per stage, so its max RSS is that stage's peak),
made smaller where a stage's cost does not depend on the image count (it is the same at every
size, so only its level, not its growth, is affected): SAEs of `--latents` latents per layer
trained for `--sae-steps` steps, one top and one quantile pick per latent without
faithfulness curves, ICAT with one method on one image per shard. Stages run as `concept-atlas build CONFIG --stages STAGE`
(the command a user runs), so the numbers include the start of Python and torch, measured on
its own as `startup`. CPU seconds (user + system of the stage's process) are the work done
whatever else shares the machine; wall seconds are also recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("make-data", "extract", "train-sae", "scan", "cafe", "index", "icat")


def config(size: int, out: Path, args: argparse.Namespace) -> dict:
    """configs/demo.yaml at `size` images, every stage in process (see the module docstring)."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["out"] = str(out)
    cfg["data"]["synthetic"].update(n=size, shard_size=args.shard_size)
    for name in ("extract", "scan", "cafe", "icat", "train_sae"):
        section = cfg[name]
        for key in ("actors", "cpus_per_actor", "workers"):
            section.pop(key, None)
        section["in_process"] = True
    train = cfg["train_sae"]
    train.update(steps=args.sae_steps, checkpoint_every=args.sae_steps, fidelity_images=100)
    for i, run in enumerate(train["sweep"]):
        run["sae"].update(n_latents=args.latents * (i + 1), dead_tokens=10_000)
    cfg["scan"].update(top_per_image=8, n_top=1, n_quantile=1)
    cfg["cafe"].update(faithfulness_per_latent=0)
    cfg["icat"].update(methods=["grad_x_act"], images_per_shard=1)
    return cfg


def run_measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd`, return its wall and CPU seconds and max RSS (MiB), from os.wait4's rusage of
    that process alone."""
    t = time.perf_counter()
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}; see {log}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "max_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def tables(root: Path) -> dict[str, float]:
    """MiB on disk per top-level folder of an atlas (tables, shards, weights)."""
    return {d.name: round(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20, 3)
            for d in sorted(root.iterdir()) if d.is_dir()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--latents", type=int, default=32, help="layer2's SAE; layer4's has twice")
    p.add_argument("--sae-steps", type=int, default=150)
    p.add_argument("--work", default="work/scale_cpu", help="where the builds go")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    python = sys.executable
    startup = run_measured([python, "-c", "import torch, timm, jobs.cli, pipeline.cafe.stage"],
                           env, log)
    result = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_at_start": os.getloadavg(), "startup": startup,
              "options": vars(args), "sizes": {}}
    if args.out and Path(args.out).exists():  # a later run adds sizes to an earlier one's
        earlier = json.loads(Path(args.out).read_text())
        result["sizes"] = earlier["sizes"]
        result["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {k: v for k, v in earlier.items() if k not in ("sizes", "earlier_runs")}]
    for size in args.sizes:
        root = work / f"n{size}"
        cfg_path = work / f"n{size}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(size, root, args), sort_keys=False))
        stages = {}
        for stage in STAGES:
            cmd = [python, "-m", "jobs.cli", "build", str(cfg_path), "--stages", stage,
                   "--no-progress"]
            stages[stage] = run_measured(cmd, env, log)
            print(f"n={size:6d} {stage:10s} {json.dumps(stages[stage])}", flush=True)
        result["sizes"][str(size)] = {"stages": stages, "storage_mib": tables(root)}
        if args.out:  # after every size: a stopped run keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
