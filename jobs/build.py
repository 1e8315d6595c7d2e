"""`concept-atlas build CONFIG.yaml`: every implemented stage in order, each resumable.

The stages are an explicit registry (`STAGES`): a stage says when the config asks for it and
how to run it. Later stages (CAFE exemplars, ICAT edges) append entries here. Every stage's
checks run first (`pipeline.build.check_build`), so a bad config fails before any work.
"""
from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.build import BuildConfig, CheckedBuild, check_build, load_build_config
from pipeline.store import fs


@dataclass(frozen=True)
class Stage:
    """A build stage: `wanted(config)` says whether the config asks for it."""

    name: str
    wanted: Callable[[BuildConfig], bool]
    run: Callable[[BuildConfig, CheckedBuild, str | None], Any]


def _make_data(cfg: BuildConfig, checked: CheckedBuild, address: str | None) -> dict[str, Any]:
    from pipeline.data.synthetic import write_shards

    syn = cfg.synthetic
    if fs.exists(fs.join(cfg.data_dir, "dataset.json")):  # check_build found it identical
        print(f"[make-data] reusing {syn['n']} synthetic images in {cfg.data_dir}", flush=True)
        return {"images": syn["n"], "reused": True}
    t = time.time()
    local = fs.local_path(cfg.data_dir)
    with tempfile.TemporaryDirectory(prefix="make-data-") as tmp:
        # a remote output gets shards written locally, then uploaded one object each
        paths = write_shards(local or tmp, n=syn["n"], seed=syn["seed"], size=syn["size"],
                             shard_size=syn["shard_size"], shortcut_prob=syn["shortcut_prob"])
        if local is None:
            for path in [*paths, Path(tmp) / "dataset.json"]:  # dataset.json last: the marker
                data = path.read_bytes()
                fs.write_atomic(fs.join(cfg.data_dir, path.name), lambda f, d=data: f.write(d))
    print(f"[make-data] wrote {syn['n']} images to {cfg.data_dir} in {time.time() - t:.1f}s",
          flush=True)
    return {"images": syn["n"], "reused": False}


def _extract(cfg: BuildConfig, checked: CheckedBuild, address: str | None) -> dict[str, Any]:
    from jobs.extract import run

    return _no_failures("extract", run(cfg.extract, cfg.shard_spec, cfg.out,
                                       atlas_id=cfg.atlas_id, address=address,
                                       **cfg.extract_runtime))


def _train_sae(cfg: BuildConfig, checked: CheckedBuild, address: str | None) -> Any:
    from jobs.train_sae import run

    return run(cfg.out, cfg.sweep, cfg.train, atlas_id=cfg.atlas_id, address=address)


def _scan(cfg: BuildConfig, checked: CheckedBuild, address: str | None) -> dict[str, Any]:
    from jobs.scan import run

    return _no_failures("scan", run(cfg.out, cfg.stages["scan"], address=address,
                                    **cfg.stage_runtime["scan"]))


def _cafe(cfg: BuildConfig, checked: CheckedBuild, address: str | None) -> dict[str, Any]:
    from jobs.cafe import run

    return _no_failures("cafe", run(cfg.out, cfg.stages["cafe"], address=address,
                                    **cfg.stage_runtime["cafe"]))


def _index(cfg: BuildConfig, checked: CheckedBuild, address: str | None) -> dict[str, Any]:
    from jobs.index import build_indexes, report

    opts = cfg.stages["index"]
    summary = build_indexes(cfg.out, opts.exact_below, opts.factory)
    report(summary)
    return summary


def _icat(cfg: BuildConfig, checked: CheckedBuild, address: str | None) -> dict[str, Any]:
    from jobs.icat import run

    return _no_failures("icat", run(cfg.out, cfg.stages["icat"], address=address,
                                    **cfg.stage_runtime["icat"]))


def _no_failures(stage: str, summary: dict[str, Any]) -> dict[str, Any]:
    if summary.get("parts_failed"):
        raise RuntimeError(f"{stage}: {len(summary['parts_failed'])} parts failed (see the "
                           "errors table); re-run the build to retry them")
    return summary


STAGES: list[Stage] = [
    Stage("make-data", lambda c: c.synthetic is not None, _make_data),
    Stage("extract", lambda c: True, _extract),
    Stage("train-sae", lambda c: c.train is not None, _train_sae),
    Stage("scan", lambda c: "scan" in c.stages, _scan),
    Stage("cafe", lambda c: "cafe" in c.stages, _cafe),
    Stage("index", lambda c: "index" in c.stages, _index),
    Stage("icat", lambda c: "icat" in c.stages, _icat),
]


def run(config: str, out: str | None = None, address: str | None = None,
        stages: Sequence[str] | None = None) -> dict[str, Any]:
    """Check the whole config, then run the wanted stages (or only `stages`) in order.

    Returns {stage name: its result}. Each stage skips the work a previous run finished.
    """
    return run_build(load_build_config(config, out), address, stages, name=config)


def run_build(cfg: BuildConfig, address: str | None = None, stages: Sequence[str] | None = None,
              name: str = "build") -> dict[str, Any]:
    """`run` for an already parsed (possibly edited) config."""
    known = [s.name for s in STAGES]
    unknown = sorted(set(stages or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages: {known}")
    t0 = time.time()
    checked = check_build(cfg)
    plan = [s for s in STAGES if s.wanted(cfg) and (not stages or s.name in stages)]
    print(f"[build] {name} -> {cfg.out}: stages {', '.join(s.name for s in plan)} "
          f"(checked in {time.time() - t0:.1f}s)", flush=True)
    results, times = {}, {}
    for stage in plan:
        t = time.time()
        results[stage.name] = stage.run(cfg, checked, address)
        times[stage.name] = time.time() - t
    print("[build] done in " + ", ".join(f"{n} {s:.0f}s" for n, s in times.items())
          + f"; total {time.time() - t0:.0f}s. Outputs in {cfg.out}/", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.build ARGS` is `concept-atlas build ARGS`."""
    from pipeline.cli import main as cli_main

    return cli_main(["build", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
