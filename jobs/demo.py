"""`concept-atlas demo`: the main job on the embedded default data and demo model.

Stages so far: synthetic shards → demo model (shipped weights) → accuracy → PFV taps on two
layers → per-layer PFV statistics. Each later stage of the atlas plugs in here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from pipeline.data.errors import ErrorLog
from pipeline.data.shards import expand_shards, iter_samples
from pipeline.data.synthetic import write_shards
from pipeline.models import load_model, tap

DEFAULT_LAYERS = {"demo_resnet": ["layer2", "layer4"], "demo_vit": ["blocks.2", "blocks.5"]}
DATA_SEED = 12345


def _ensure_data(data_dir: Path, n_images: int) -> list[str]:
    spec_file = data_dir / "dataset.json"
    if spec_file.exists():
        spec = json.loads(spec_file.read_text())
        if spec.get("n") == n_images and spec.get("seed") == DATA_SEED:
            print(f"[data] reusing {n_images} synthetic images in {data_dir}")
            return expand_shards(str(data_dir))
    t = time.time()
    write_shards(data_dir, n=n_images, seed=DATA_SEED, shard_size=500)
    print(f"[data] wrote {n_images} synthetic images to {data_dir} in {time.time() - t:.1f}s")
    return expand_shards(str(data_dir))


def _pfv_stats(values: torch.Tensor) -> dict:
    """Summary of PFVs [M, C] (M = images x positions)."""
    norms = values.norm(dim=1)
    active = (values > 0).float()
    mean_c = values.mean(0)
    return {
        "pfvs": int(values.shape[0]),
        "channels": int(values.shape[1]),
        "mean_norm": round(float(norms.mean()), 4),
        "std_norm": round(float(norms.std()), 4),
        "zero_frac": round(float((values == 0).float().mean()), 4),
        "active_channels_per_pfv": round(float(active.sum(1).mean()), 2),
        "dead_channels": int((active.sum(0) == 0).sum()),
        "top_channels_by_mean": [int(i) for i in mean_c.topk(5).indices],
    }


def run(out: Path, n_images: int = 2000, model_name: str = "demo_resnet",
        layers: Sequence[str] | None = None, batch_size: int = 64) -> dict:
    """Run the demo end to end into `out`; returns the summary that is also written as JSON."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shards = _ensure_data(out / "data", n_images)
    layers = list(layers or DEFAULT_LAYERS.get(model_name, []))
    if not layers:
        raise ValueError(f"no default layers for {model_name!r}; pass --layers")
    loaded = load_model(model_name, "default")
    print(f"[model] {model_name} with its shipped weights; tapping {', '.join(layers)}")

    errors = ErrorLog()
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    grids: dict[str, tuple[int, int]] = {}
    correct = total = 0
    batch_imgs: list = []
    batch_cls: list[int] = []

    def flush() -> None:
        nonlocal correct, total
        x = loaded.preprocess(batch_imgs)
        pfvs = tap(loaded.model, x, layers)
        with torch.no_grad():
            pred = loaded.model(x).argmax(-1)
        correct += int((pred == torch.tensor(batch_cls)).sum())
        total += len(batch_cls)
        for name, p in pfvs.items():
            collected[name].append(p.values[:, ~p.special].reshape(-1, p.values.shape[-1]))
            grids[name] = p.grid
        batch_imgs.clear()
        batch_cls.clear()

    for s in tqdm(iter_samples(shards, errors, stage="demo"), total=n_images, desc="tap", unit="img"):
        batch_imgs.append(s.image)
        batch_cls.append(int(s.cls))
        if len(batch_imgs) == batch_size:
            flush()
    if batch_imgs:
        flush()

    summary = {"model": model_name, "images": total, "accuracy": round(correct / max(total, 1), 4),
               "errors": len(errors.records), "layers": {}}
    print(f"\n[accuracy] {model_name}: {summary['accuracy']:.2%} on {total} demo images")
    print(f"\n{'layer':<10} {'grid':>6} {'C':>5} {'PFVs':>9} {'mean|v|':>8} {'zero%':>6} {'active':>7} {'dead':>5}")
    for name in layers:
        st = _pfv_stats(torch.cat(collected[name]))
        st["grid"] = list(grids[name])
        summary["layers"][name] = st
        print(f"{name:<10} {grids[name][0]:>2}x{grids[name][1]:<3} {st['channels']:>5} {st['pfvs']:>9} "
              f"{st['mean_norm']:>8.3f} {100 * st['zero_frac']:>6.1f} {st['active_channels_per_pfv']:>7.1f} "
              f"{st['dead_channels']:>5}")
    (out / "pfv_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[done] in {time.time() - t0:.0f}s. Results in {out}/ (pfv_stats.json).")
    print("Next: `concept-atlas layers --model demo_vit`, or "
          f"`concept-atlas demo --model demo_vit --out {out}_vit`.")
    return summary
