"""`concept-atlas demo`: `build configs/demo.yaml` into `demo_out/`, then a short summary.

Stages so far (jobs/build.py): synthetic shards → PFV extraction on Ray (per-layer PFV
statistics) → one SAE per tapped layer with Ray Train (held-out FVU, L0, dead latents, logit
fidelity, and the model's accuracy). Each later stage of the atlas plugs into the build.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from jobs.build import run_build
from pipeline.build import load_build_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEFAULT_LAYERS = {"demo_resnet": ["layer2", "layer4"], "demo_vit": ["blocks.1", "blocks.3"]}


def run(out: Path, n_images: int | None = None, model_name: str = "demo_resnet",
        layers: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the demo atlas into `out`; returns the summary also written to `out/summary.json`.

    `n_images`, `model_name` and `layers` override the demo config; the config's SAE sweep is
    applied to the chosen layers in order.
    """
    t0 = time.time()
    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(f"demo config not found at {DEMO_CONFIG}; run from a clone")
    cfg = load_build_config(DEMO_CONFIG, out=str(out))
    if n_images is not None:
        cfg.synthetic["n"] = n_images
    if model_name != cfg.extract.model or layers:
        layers = list(layers or DEFAULT_LAYERS.get(model_name, []))
        if not layers:
            raise ValueError(f"no default layers for {model_name!r}; pass --layers "
                             f"(`concept-atlas layers --model {model_name}` lists them)")
        cfg.extract = dataclasses.replace(cfg.extract, model=model_name, layers=tuple(layers))
        template = cfg.sweep
        cfg.sweep = [dict(template[min(i, len(template) - 1)], layer=layer)
                     for i, layer in enumerate(layers)]
    results = run_build(cfg, name="demo")
    extract, saes = results["extract"], results["train-sae"]
    accuracy = saes[0]["model_accuracy"] if saes else None
    summary = {
        "model": cfg.extract.model, "images": extract["images"], "errors": extract["errors"],
        "accuracy": None if accuracy is None else round(accuracy, 4),
        "heldout_images": saes[0]["heldout_images"] if saes else 0,
        "layers": extract["layers"],
        "saes": [{k: r[k] for k in ("sae_id", "layer", "n_latents", "k", "fvu", "l0", "dead_frac",
                                    "dense_frac", "logit_agreement", "logit_kl")} for r in saes],
    }
    summary["saliency"] = write_saliency(Path(out), cfg)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # the accuracy line was printed by train-sae's summary
    print(f"\n[done] in {time.time() - t0:.0f}s. Results in {out}/ (summary.json; tables images/, "
          "layers/, pfv/, saes/, errors/, manifest/; SAE weights in sae_weights/).")
    print("Next: every table is Parquet under the output folder; in Python, for example:\n"
          f"  import duckdb; duckdb.sql(\"SELECT sae_id, fvu, l0, dead_frac FROM '{out}/saes/*.parquet'\").show()\n"
          "and `concept-atlas layers --model demo_resnet` lists the layers a build can tap.")
    return summary


def write_saliency(out: Path, cfg: Any, n: int = 4) -> list[dict[str, Any]]:
    """SRD saliency panels (input | signed map | overlay) of the first `n` images of the last
    (held-out) shard -> `out/saliency/KEY.png`; returns one record per image."""
    from pipeline.data.errors import ErrorLog
    from pipeline.data.shards import expand_shards, iter_samples
    from pipeline.explain import explain_images
    from pipeline.models import load_model

    loaded = load_model(cfg.extract.model, cfg.extract.weights)
    samples = []
    for s in iter_samples(expand_shards(cfg.shard_spec)[-1:], ErrorLog(), stage="demo"):
        samples.append(s)
        if len(samples) == n:
            break
    (out / "saliency").mkdir(exist_ok=True)
    records = []
    for s, (panel, facts) in zip(samples, explain_images(loaded, [s.image for s in samples])):
        path = out / "saliency" / f"{s.key}.png"
        panel.save(path)
        records.append({"key": s.key, "label": s.cls, **facts, "png": str(path)})
    print(f"[saliency] SRD maps of {len(records)} held-out images in {out}/saliency/ "
          "(input | signed map, red = for the class | overlay)")
    return records
