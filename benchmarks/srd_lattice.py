"""Where the dot lattice and the border band of SRD maps on strided networks come from.

For efficientnet_lite0 (real ImageNet weights) on the bundled photos, measures the lattice of
the SRD map and of input x gradient: the mean |R| over the p x p phase classes of the pixel grid
(pixels (i, j) with i = a, j = b mod p), reported as max / min over the classes (1.0: no
lattice), for p = 2, 4, 8 away from the border; and the border band, mean |R| of the outer 8 px
ring over the interior's. Then the same after the display blur (`viz.smooth_for_display`,
sigma 1 px). Draws docs/img/srd_lattice.png (photo | raw SRD | blurred SRD | input x grad) and
writes benchmarks/results/srd_lattice.json.

    python benchmarks/srd_lattice.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, not benchmarks/pipeline.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import srd  # noqa: E402
from pipeline.data.photos import BUNDLED  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.viz import (captioned, denormalise, enlarged, side_by_side,  # noqa: E402
                          signed_heatmap, smooth_for_display)

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
PICTURED = ("chelsea", "rocket")  # the picture shows two of them (the repo stays small)
PERIODS = (2, 4, 8)


def phase_ratio(m: np.ndarray, p: int, border: int = 16) -> float:
    """max / min over the p x p phase classes of mean |m|, border pixels left out."""
    a = np.abs(m)[border:-border, border:-border]
    means = np.array([[a[i::p, j::p].mean() for j in range(p)] for i in range(p)])
    return float(means.max() / means.min())


def border_ratio(m: np.ndarray, b: int = 8) -> float:
    """Mean |m| of the outer b-pixel ring over that of the interior."""
    a = np.abs(m)
    ring = np.ones_like(a, bool)
    ring[b:-b, b:-b] = False
    return float(a[ring].mean() / a[~ring].mean())


def measure(name: str, m: np.ndarray) -> dict:
    return {"map": name, **{f"phase_p{p}": round(phase_ratio(m, p), 3) for p in PERIODS},
            "border": round(border_ratio(m), 3), "sum": round(float(m.sum()), 4)}


def main() -> None:
    torch.set_num_threads(1)
    loaded = load_model("efficientnet_lite0", "imagenet")
    loader = {stem: load for (_, stem), load in BUNDLED.items()}
    rows, panels = [], []
    for stem in PHOTOS:
        image = Image.fromarray(np.asarray(loader[stem]())).convert("RGB")
        x = loaded.preprocess([image])
        res = srd.explain(loaded.model, x, None, False)
        raw = res.pixels[0, 0].detach().double().numpy()
        xg = x.clone().requires_grad_(True)
        loaded.model(xg)[0, int(res.target[0])].backward()
        grad = (xg.grad * xg).sum(1)[0].detach().double().numpy()
        blurred = smooth_for_display(raw, 1.0)
        for name, m in (("srd", raw), ("srd, blurred sigma 1", blurred), ("input x grad", grad)):
            rows.append({"photo": stem, **measure(name, m)})
        if stem not in PICTURED:
            continue
        shown = denormalise(x[0].numpy(), loaded.data_config["mean"], loaded.data_config["std"])
        panels.append(captioned(side_by_side([enlarged(a) for a in (
            shown, signed_heatmap(raw), signed_heatmap(blurred), signed_heatmap(grad))]),
            [f"{stem}: photo | SRD raw | SRD shown with sigma 1 px | input x gradient"]))
    print(f"{'photo':10} {'map':22} " + " ".join(f"{'p=' + str(p):>6}" for p in PERIODS)
          + f" {'border':>7}")
    for r in rows:
        print(f"{r['photo']:10} {r['map']:22} "
              + " ".join(f"{r[f'phase_p{p}']:6.2f}" for p in PERIODS) + f" {r['border']:7.2f}")
    means = {name: {k: round(float(np.mean([r[k] for r in rows if r["map"] == name])), 3)
                    for k in [f"phase_p{p}" for p in PERIODS] + ["border"]}
             for name in dict.fromkeys(r["map"] for r in rows)}
    print("means:", json.dumps(means))
    out = ROOT / "benchmarks" / "results" / "srd_lattice.json"
    out.write_text(json.dumps({"model": "efficientnet_lite0 (imagenet)", "rows": rows,
                               "means": means}, indent=2) + "\n")
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    (ROOT / "docs" / "img").mkdir(exist_ok=True)
    sheet.save(ROOT / "docs" / "img" / "srd_lattice.png")
    print(f"wrote {out} and docs/img/srd_lattice.png")


if __name__ == "__main__":
    main()
