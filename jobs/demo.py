"""`concept-atlas demo`: `build configs/demo.yaml` into `demo_out/`, then a tour of the atlas.

The build (jobs/build.py): synthetic shards → PFV extraction on Ray → one SAE per tapped layer
(Ray Train) → the latent scan (activations, latent stats, exemplar picks) → CAFE (latent iERF
masks and faithfulness per exemplar) → FAISS indexes → ICAT edges. Then SRD saliency maps of a
few held-out images, three example SQL queries with their answers, and the concept route of
one image.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from jobs.build import BuildConfig, load_build_config, run_build

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG, REAL_CONFIG = CONFIGS / "demo.yaml", CONFIGS / "demo_real.yaml"
DEFAULT_LAYERS = {"demo_resnet": ["layer2", "layer4"], "demo_vit": ["blocks.1", "blocks.3"],
                  "demo_vitc": ["blocks.1", "blocks.3"]}


def run(out: Path, n_images: int | None = None, model_name: str | None = None,
        layers: Sequence[str] | None = None, real: bool = False,
        photos: str | None = None) -> dict[str, Any]:
    """Build the demo atlas into `out`; returns the summary also written to `out/summary.json`.

    The synthetic demo (configs/demo.yaml) by default; `real` (or `photos`, a folder of
    images) the real-photo demo (configs/demo_real.yaml: efficientnet_lite0 with ImageNet
    weights on crops of the photos Python packages bundle, or of `photos`). `n_images` (the
    synthetic demo only), `model_name` and `layers` override the config; its SAE sweep is
    applied to the chosen layers in order.
    """
    t0 = time.time()
    real = real or photos is not None
    config = REAL_CONFIG if real else DEMO_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"demo config not found at {config}; run from a clone")
    cfg = load_build_config(config, out=str(out))
    if real:
        if n_images is not None:
            raise ValueError(f"--n {n_images} sets the synthetic demo's image count; the real "
                             "demo takes its images from --photos DIR (default: bundled photos)")
        if photos is None:
            from pipeline.data.photos import write_bundled_photos

            photos = str(Path(out) / "photos")
            found = write_bundled_photos(photos)
            print(f"[photos] {len(found)} photos bundled with scikit-image, scikit-learn and "
                  f"matplotlib in {photos}/")
        elif not Path(photos).is_dir():
            raise FileNotFoundError(f"--photos {photos}: not a folder of images")
        cfg.options["make-shards"] = dataclasses.replace(cfg.options["make-shards"],
                                                         src=str(Path(photos).resolve()))
    elif n_images is not None:
        cfg.options["make-data"] = dataclasses.replace(cfg.options["make-data"], n=n_images)
    with_model(cfg, model_name, layers)
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
    samples = heldout_samples(cfg, 4)
    summary["saliency"] = write_saliency(Path(out), cfg, samples)
    summary["queries"] = example_queries(str(out), REAL_QUERIES if real else EXAMPLE_QUERIES)
    summary["route"] = write_route(Path(out), samples[0], label=None if real else samples[0].cls)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # the accuracy line was printed by train-sae's summary
    print(f"\n[done] in {time.time() - t0:.0f}s. The atlas is in {out}/ (summary.json, Parquet "
          "tables, FAISS indexes in index/, SRD maps in saliency/, a concept route in route.png).")
    last = f"{list(summary['layers'])[-1]}:0"  # latent 0 of the deepest layer
    print("Next, for example:\n"
          f"  concept-atlas sql {out} \"SELECT * FROM latents ORDER BY max_act DESC LIMIT 10\"\n"
          f"  concept-atlas latent {out} {last} --out latent.png       # exemplars with iERF masks\n"
          f"  concept-atlas similar {out} --latent {last}\n"
          f"  concept-atlas search {out} --image {summary['saliency'][0]['input']} -k 5\n"
          f"  concept-atlas routes {out} --image {summary['saliency'][0]['input']} --out route.png\n"
          "and `concept-atlas --help` lists every command (docs/atlas.md: the tables and views).")
    return summary


def with_model(cfg: BuildConfig, model_name: str | None = None,
               layers: Sequence[str] | None = None, weights: str | None = None) -> BuildConfig:
    """Point `cfg` (edited in place, and returned) at another model, its layers and weights.

    Layers default to DEFAULT_LAYERS of the model; the config's SAE sweep is applied to the
    layers in order (its last entry to any further layer). Unchanged when nothing differs."""
    model_name = model_name or cfg.extract.model
    if model_name != cfg.extract.model or layers or weights:
        layers = list(layers or DEFAULT_LAYERS.get(model_name, []))
        if not layers:
            raise ValueError(f"no default layers for {model_name!r}; pass --layers "
                             f"(`concept-atlas layers --model {model_name}` lists them)")
        cfg.extract = dataclasses.replace(cfg.extract, model=model_name, layers=tuple(layers),
                                          weights=weights or cfg.extract.weights)
        template = cfg.train.sweep
        cfg.train = dataclasses.replace(cfg.train, sweep=tuple(
            dict(template[min(i, len(template) - 1)], layer=layer)
            for i, layer in enumerate(layers)))
    return cfg


# three questions the demo asks its atlas, printed with their answers
EXAMPLE_QUERIES = {
    "latents per layer: how many, how many dead, mean firing frequency, CAFE faithfulness":
        "SELECT layer, count(*) AS latents, count(*) FILTER (dead) AS dead, "
        "round(avg(freq), 4) AS mean_freq, round(avg(cafe_ins_auc), 3) AS ins_auc_ierf, "
        "round(avg(ins_auc_act), 3) AS ins_auc_act FROM latents GROUP BY layer ORDER BY layer",
    "the latents most faithful to one ground-truth concept (their top exemplars' iERF masks)":
        "SELECT layer, latent, label_hint, round(label_hint_frac, 2) AS frac, "
        "round(gt_iou_ierf, 3) AS iou_ierf, round(gt_iou_act, 3) AS iou_act FROM latents "
        "WHERE label_hint IS NOT NULL ORDER BY label_hint_frac DESC, gt_iou_ierf DESC LIMIT 5",
    "the strongest ICAT-IG edges into each class logit (summed over the sampled images)":
        "SELECT dst_latent AS class, src_layer || ':' || src_latent AS source, "
        "round(weight, 2) AS weight, n_images FROM edges WHERE dst_layer = 'logits' "
        "AND method = 'ig' AND scope = 'all' "
        "QUALIFY row_number() OVER (PARTITION BY dst_latent ORDER BY weight DESC) = 1 "
        "ORDER BY class",
}


# the real-photo demo's questions: its labels are the photos' categories, its classes ImageNet's
REAL_QUERIES = {
    "latents per layer: how many, how many dead, how many source photos their top exemplars span":
        "SELECT layer, count(*) AS latents, count(*) FILTER (dead) AS dead, "
        "round(avg(n_sources), 2) AS mean_sources, "
        "count(*) FILTER (n_sources >= 3) AS spanning_3_photos FROM latents "
        "GROUP BY layer ORDER BY layer",
    "latents whose top exemplars agree on a photo category, with the class each drives":
        "SELECT layer, latent, label_hint, round(label_hint_frac, 2) AS frac, n_sources, "
        "drives_class FROM latents WHERE label_source = 'image labels' AND n_sources >= 3 "
        "ORDER BY label_hint_frac DESC, max_act DESC LIMIT 5",
    "the strongest ICAT-IG edge into each of the most driven ImageNet classes, by name":
        "SELECT c.name AS class, e.src_layer || ':' || e.src_latent AS source, "
        "round(e.weight, 2) AS weight, e.n_images FROM edges e JOIN classes c "
        "ON c.class = e.dst_latent WHERE e.dst_layer = 'logits' AND e.method = 'ig' "
        "AND e.scope = 'all' AND e.src_latent >= 0 "
        "QUALIFY row_number() OVER (PARTITION BY e.dst_latent ORDER BY e.weight DESC) = 1 "
        "ORDER BY e.weight DESC LIMIT 8",
}


def example_queries(out: str, queries: dict[str, str] = EXAMPLE_QUERIES) -> list[dict[str, Any]]:
    """Run `queries` ({question: SQL}) on the atlas at `out`, print each with its answer,
    return them."""
    from pipeline.atlas import Atlas

    atlas, answers = Atlas.open(out), []
    for question, query in queries.items():
        table = atlas.sql(query)
        print(f"\n[query] {question}\n  {query}")
        print(table.to_pandas().to_string(index=False))
        answers.append({"question": question, "sql": query, "rows": table.to_pylist()})
    return answers


def write_route(out: Path, sample: Any, label: int | None) -> dict[str, Any]:
    """The concept route of one held-out image into its predicted class (and `label`, a class
    of the model, when given): printed, written as `out/route.json` and drawn to
    `out/route.png`."""
    from pipeline.atlas import Atlas
    from pipeline.atlas.route_render import render_route

    route = Atlas.open(str(out)).routes(sample.image, label=label)
    (out / "route.json").write_text(route.to_json() + "\n")
    render_route(route, str(out), out / "route.png")
    print(f"\n[route] image {sample.key}:\n{route.text()}")
    return {"key": sample.key, "json": str(out / "route.json"), "png": str(out / "route.png")}


def heldout_samples(cfg: Any, n: int) -> list[Any]:
    """The first `n` samples of the last (held-out) shard of the build's data."""
    from pipeline.data.errors import ErrorLog
    from pipeline.data.shards import expand_shards, iter_samples

    samples = []
    for s in iter_samples(expand_shards(list(cfg.extract.shards))[-1:], ErrorLog(), stage="demo"):
        samples.append(s)
        if len(samples) == n:
            break
    return samples


def write_saliency(out: Path, cfg: Any, samples: list[Any]) -> list[dict[str, Any]]:
    """SRD saliency panels (input | signed map | overlay) of `samples` ->
    `out/saliency/KEY.png`, and each input image as `KEY-input.png` (to try other commands on);
    returns one record per image."""
    from pipeline.explain import explain_images
    from pipeline.models import load_model

    loaded = load_model(cfg.extract.model, cfg.extract.weights)
    (out / "saliency").mkdir(exist_ok=True)
    records = []
    for s, (panel, facts) in zip(samples, explain_images(loaded, [s.image for s in samples])):
        path = out / "saliency" / f"{s.key}.png"
        panel.save(path)
        s.image.save(out / "saliency" / f"{s.key}-input.png")
        records.append({"key": s.key, "label": s.cls, **facts, "png": str(path),
                        "input": str(out / "saliency" / f"{s.key}-input.png")})
    print(f"[saliency] SRD maps of {len(records)} held-out images in {out}/saliency/ "
          "(input | signed map, red = for the class | overlay)")
    return records
