"""Cross-check of the saliency metrics (pipeline/evaluation/metrics.py) against Quantus.

    python benchmarks/quantus_crosscheck.py --size 96 --models demo_resnet   # curves equal to rounding
    python benchmarks/quantus_crosscheck.py --size 128                        # the evaluation's size

For the same maps, images and model, each of our numbers is set beside Quantus's:
- **deletion**: Quantus's `PixelFlipping` (Bach et al.) perturbs the 3 H W input entries in the
  order of the map broadcast to every channel, `features_in_step` entries at a time, and records the
  softmax probability of the class *after* each step. With features_in_step = 3 H W / K and a map
  with no ties, a step moves the 3 channels of H W / K pixels, as our curve does, **if** H W / K is
  a whole number of pixels. Quantus asserts that features_in_step divides H W (not 3 H W), so K must
  be a multiple of 3, and H W / K is whole only when 3 divides H W: at 96 px (9216 = 3 x 3072) the
  curves must agree to rounding; at the evaluation's 128 px (and 224 px) no K allows it, a Quantus
  step moves 341 1/3 pixels (K = 48) and splits a pixel's channels between two steps, and the
  curves differ by that. Pixels whose map values tie are ordered by Quantus's argsort and by our
  seeded shuffle differently (a CAM's zero plateau); the share of tied pixels is reported. Quantus fills with
  a baseline *value* (its "mean" is one grey, the mean over all channels of the image); ours is the
  image's own per-channel mean colour, so Quantus is run twice: with a perturbation function that
  takes the replaced entries from our baseline image (`_from_source`, the curves must then agree
  to float rounding), and with its own "mean" (the difference is then the fill colour alone).
- **insertion**: Quantus has no insertion metric. `PixelFlipping` started from our blurred image
  with the same `_from_source` function taking the entries from the real image *is* insertion; its
  curve must equal ours.
- **AUC**: Quantus's AUC is `np.trapz(curve, dx=1)` over the K points after each step; ours is the
  trapezoid over the K + 1 points from 0 to 1 (the unperturbed image included) with dx = 1 / K, so
  ours = (Quantus's + (c_0 + c_1) / 2) / K, c_0 the unperturbed score. Checked to rounding.
- **pointing game**: Quantus's `PointingGame` counts a hit when *any* of the tied maxima lies in the
  mask; ours looks at the first maximum in row-major order. Equal where the maximum is unique; the
  number of maps with tied maxima is reported (grad-cam's bilinear upsampling makes 2-4 equal
  pixels around a grid maximum).
- **Gini** (sparseness): Quantus's `Sparseness` (Chalasani et al.) is the same formula as ours on
  |map| / max |map|, but adds 1e-7 to every entry first, and its default `normalise_by_max` takes the
  max over the whole *batch* (normalise_axes None: every axis), so
  G_quantus = G * S / (S + n 1e-7), S = sum |map| / (max |map| over the batch), n pixels: a
  difference that depends on the other images of the batch; checked to rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pipeline.evaluation import Unsupported, make_method, metrics  # noqa: E402

GINI_SHIFT = 1e-7  # what Quantus's Sparseness adds to every |map| entry


def _from_source(arr: np.ndarray, indices: np.ndarray, source: np.ndarray, **_: object) -> np.ndarray:
    """Quantus perturbation function: the entries `indices` [N, I] of `arr` [N, F] replaced by those
    of `source` [N, F] (our baseline image, or the real image for insertion)."""
    out = arr.copy()
    rows = np.arange(arr.shape[0])[:, None]
    out[rows, indices] = source[rows, indices]
    return out


def _tied_share(values: Tensor) -> float:
    """Share of the entries of a 1-D tensor whose value some other entry has too."""
    counts = torch.unique(values, return_counts=True)[1]
    return float(counts[counts > 1].sum() / values.numel())


def _pixel_flipping(model: nn.Module, start: Tensor, fill: Tensor | str, maps: Tensor, target: Tensor,
                    steps: int) -> np.ndarray:
    """Quantus's PixelFlipping curve [N, steps] from `start`, the entries moved to `fill` (an image
    batch like `start`, or a Quantus baseline name) in the order of `maps` [N, H, W]."""
    import quantus

    n, c, h, w = start.shape
    if steps % c or (h * w) % (steps // c):
        raise ValueError(f"steps must be a multiple of {c} with H W divisible by steps / {c} (Quantus "
                         f"asserts H W % features_in_step == 0, features_in_step = {c} H W / steps); got "
                         f"steps={steps} for {h}x{w}")
    kwargs: dict = {"perturb_baseline": fill} if isinstance(fill, str) else {
        "perturb_func": _from_source, "perturb_func_kwargs": {"source": fill.reshape(n, -1).numpy()}}
    metric = quantus.PixelFlipping(features_in_step=c * h * w // steps, normalise=False, abs=False,
                                   disable_warnings=True, **kwargs)
    curves = metric(model=model, x_batch=start.numpy(), y_batch=target.numpy(),
                    a_batch=maps[:, None].numpy(), channel_first=True, softmax=True, device="cpu",
                    batch_size=n)
    return np.asarray(curves)


def compare(model: nn.Module, x: Tensor, target: Tensor, masks: Tensor, maps: Tensor, steps: int = 48) -> dict:
    """Our metrics and Quantus's on the same maps [N, H, W] of images x [N, 3, H, W] (class
    `target`, object masks [N, H, W]): per metric the largest difference over images, and for
    deletion also the difference made by Quantus's own "mean" fill."""
    import quantus

    model = model.eval()
    order = metrics.pixel_order(maps)
    flat = maps.flatten(1)
    tied_pixels = [_tied_share(row) for row in flat]
    out: dict = {"images": len(x), "steps": steps, "size": list(x.shape[2:]),
                 "whole_pixels_per_step": (x.shape[2] * x.shape[3]) % steps == 0,
                 "share_of_pixels_with_tied_values": tied_pixels}
    blur, mean = metrics.blur_baseline(x), metrics.mean_baseline(x)

    def auc_of_quantus_curve(curve: np.ndarray, start_score: np.ndarray) -> np.ndarray:
        # Quantus's calculate_auc (np.trapz, dx=1) over the K points after each step, plus the
        # first interval from the unperturbed score, over K: our AUC on [0, 1]. np.trapezoid:
        # NumPy 2.4 removed trapz, so Quantus 0.6's own return_auc_per_sample fails there
        return (np.trapezoid(curve, dx=1, axis=1) + (start_score + curve[:, 0]) / 2) / steps

    # (mode, Quantus's start image, where its perturbation takes the entries from, our baseline)
    for mode, start, end, baseline in (("deletion", x, mean, mean), ("insertion", blur, x, blur)):
        ours = metrics.insertion_deletion_curve(model, x, order, target, baseline, mode, steps).numpy()
        theirs = _pixel_flipping(model, start, end, maps, target, steps)
        our_auc = metrics.auc(torch.from_numpy(ours)).numpy()
        auc_from_quantus = auc_of_quantus_curve(theirs, ours[:, 0])
        out[mode] = {"curve_max_abs_diff": float(np.abs(ours[:, 1:] - theirs).max()),
                     "auc_ours": our_auc.tolist(), "auc_from_quantus": auc_from_quantus.tolist(),
                     "auc_max_abs_diff": float(np.abs(our_auc - auc_from_quantus).max())}
        if mode == "deletion":  # Quantus's own "mean" fill: one grey, the mean over all channels
            grey_auc = auc_of_quantus_curve(_pixel_flipping(model, x, "mean", maps, target, steps), ours[:, 0])
            out[mode] |= {"auc_quantus_grey_fill": grey_auc.tolist(),
                          "auc_diff_grey_vs_colour_fill": float(np.abs(grey_auc - our_auc).max())}
    hits = metrics.pointing_game(maps, masks).numpy()
    q_hits = np.asarray(quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=maps[:, None].numpy(),
        s_batch=masks[:, None].numpy().astype(np.float32), channel_first=True, device="cpu"), dtype=float)
    tied = (flat == flat.amax(1, keepdim=True)).sum(1) > 1
    out["pointing"] = {"ours": hits.tolist(), "quantus": q_hits.tolist(), "maps_with_tied_maxima": int(tied.sum()),
                       "disagreements": int((hits != q_hits).sum()),
                       "disagreements_with_unique_maximum": int(((hits != q_hits) & ~tied.numpy()).sum())}
    # both in float64, so that only the formulas differ
    gini = metrics.gini(maps.double()).numpy()
    q_gini = np.asarray(quantus.Sparseness(disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=maps[:, None].double().numpy(),
        channel_first=True, device="cpu"), dtype=float)
    a = maps.abs().flatten(1).double()
    s = (a.sum(1) / a.max()).numpy()  # Quantus's normalise_by_max divides by the max over the whole batch
    predicted = gini * s / (s + a.shape[1] * GINI_SHIFT)
    out["gini"] = {"ours": gini.tolist(), "quantus": q_gini.tolist(), "max_abs_diff": float(np.abs(gini - q_gini).max()),
                   "max_abs_diff_after_shift_correction": float(np.abs(predicted - q_gini).max())}
    return out


def main() -> None:
    from pipeline.evaluation.data import synthetic_set
    from pipeline.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=96, help="image side; 96: 3 divides H W (see above)")
    p.add_argument("--steps", type=int, default=48, help="curve steps: a multiple of 3 (Quantus's step size)")
    p.add_argument("--models", nargs="+", default=["demo_resnet", "demo_vit"])
    p.add_argument("--methods", nargs="+", default=["Saliency", "IntegratedGradients", "GradCAM", "ScoreCAM",
                                                    "AttnLRP", "SRD"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantus_crosscheck.json")
    args = p.parse_args()
    import quantus

    torch.set_num_threads(1)
    imgs, labels, masks = synthetic_set(args.images, 2026, size=args.size)
    result: dict = {"command": " ".join(["quantus_crosscheck.py"] + sys.argv[1:]), "quantus": quantus.__version__,
                    "size": args.size, "runs": {}}
    for model_name in args.models:
        lm = load_model(model_name, "default")
        # preprocess resizes to the model's size: normalise the images at their own size instead
        mean, std = (torch.tensor(lm.data_config[k]).reshape(1, 3, 1, 1) for k in ("mean", "std"))
        x = (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255 - mean) / std
        t = torch.as_tensor(labels)
        for name in args.methods:
            try:
                maps = make_method(name, lm.model, ig_steps=16)(x, t)
            except Unsupported as e:
                result["runs"][f"{model_name}/{name}"] = {"status": f"unsupported: {e}"}
                continue
            row = compare(lm.model, x, t, torch.as_tensor(masks), maps, args.steps)
            result["runs"][f"{model_name}/{name}"] = row
            print(f"{model_name:12s} {name:20s} del curve {row['deletion']['curve_max_abs_diff']:.1e} "
                  f"AUC {row['deletion']['auc_max_abs_diff']:.1e} (grey fill {row['deletion']['auc_diff_grey_vs_colour_fill']:.3f})"
                  f" | ins curve {row['insertion']['curve_max_abs_diff']:.1e} AUC {row['insertion']['auc_max_abs_diff']:.1e}"
                  f" | pointing {row['pointing']['disagreements']} differ ({row['pointing']['maps_with_tied_maxima']} tied)"
                  f" | Gini {row['gini']['max_abs_diff']:.1e} -> {row['gini']['max_abs_diff_after_shift_correction']:.1e}"
                  f" | tied pixels {max(row['share_of_pixels_with_tied_values']):.2f}",
                  flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
