"""Cost of an SRD class map per supported timm family, as a ratio to a plain input gradient.

    python benchmarks/srd_families.py                      # every family, 96 px, batch 2, 1 thread
    python benchmarks/srd_families.py --models resnet50 convnext_tiny --size 128   # re-measure these rows

Each model is the full timm architecture (random weights, float32, eval) at a small input size,
run on one CPU thread: `srd.saliency` (predicted class) against forward + backward of the input
gradient of the same logits on the same batch, best wall time of `--repeats` interleaved rounds
after a warm-up (`benchmarks/srd.py`'s `timed`). Ratios are meaningful within one run on one
machine; absolute times are not comparable across machines. VGG and Swin run at 224 px (VGG's fc6
is a 7x7 conv over the 7x7 pooled map; Swin's 7x7 windows must tile every stage's grid). Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from benchmarks.results_io import write_results  # noqa: E402
from benchmarks.srd import method, timed  # noqa: E402

# family -> timm models measured for it; ViTs take img_size, VGG needs 224 px
FAMILIES = {
    "ResNet": ["resnet18", "resnet50"],
    "VGG": ["vgg11_bn"],
    "ViT / DeiT": ["vit_small_patch16_224", "deit_small_patch16_224"],
    "CLIP ViT": ["vit_base_patch16_clip_224"],
    "DINOv2 ViT": ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"],
    "ViT with a conv stem": ["vit_base_mci_224"],
    "EfficientNet-Lite": ["efficientnet_lite0"],
    "EfficientNet (SE)": ["efficientnet_b0"],
    "MobileNetV3": ["mobilenetv3_small_100", "mobilenetv3_large_100"],
    "ConvNeXt": ["convnext_atto", "convnext_tiny"],
    "Swin": ["swin_tiny_patch4_window7_224"],
}


def measure(name: str, size: int, batch: int, repeats: int) -> dict[str, float | int | str]:
    """SRD and input-gradient wall times (s) of one model on one random batch."""
    torch.manual_seed(0)
    if name.startswith(("vgg", "swin")):  # VGG's fc6 and Swin's 7x7 windows at every stage need 224 px
        size = 224
    if "patch14" in name:
        size = size // 14 * 14
    kwargs = {"img_size": size} if ("patch1" in name or "_mci_" in name) and not name.startswith("swin") else {}
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs).eval()
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        target = model(images).argmax(1)
    fns = {m: method(m, model, images, target, 0, 0) for m in ("grad", "srd")}
    best = timed(fns, repeats, "cpu")
    return {"model": name, "size": size, "batch": batch, "repeats": repeats, "grad_s": best["grad"],
            "srd_s": best["srd"], "ratio": best["srd"] / best["grad"], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="timm model names (default: every family's)")
    ap.add_argument("--size", type=int, default=96, help="input size in px (VGG: 224)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "srd_families_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the ratio does not depend on how each op parallelises
    family_of = {m: f for f, ms in FAMILIES.items() for m in ms}
    names = args.models or list(family_of)
    rows = []
    print("| family | model | px | input gradient (s) | SRD (s) | SRD / gradient |")
    print("|---|---|---|---|---|---|")
    for name in names:
        row = {"family": family_of.get(name, "?"), **measure(name, args.size, args.batch, args.repeats)}
        rows.append(row)
        print(f"| {row['family']} | {name} | {row['size']} | {row['grad_s']:.3f} | {row['srd_s']:.3f} "
              f"| {row['ratio']:.1f} |", flush=True)
    if args.models and args.out.exists():  # re-measured models replace their rows, the rest are kept
        kept = [r for r in json.loads(args.out.read_text())["rows"] if r["model"] not in args.models]
        rows = sorted(kept + rows, key=lambda r: list(family_of).index(r["model"]) if r["model"] in family_of else 99)
    write_results(args.out, {
        "what": "SRD saliency vs plain input gradient, random weights, float32, best of repeats; "
                "each row's two timings come from the same interleaved rounds",
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "rows": rows})


if __name__ == "__main__":
    main()
