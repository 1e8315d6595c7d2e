"""The cost of an ImageNet-1k atlas (docs/scale.md): GPU-hours, wall-clock on 8 GPUs, storage per
table, memory per stage, for ResNet-50 and ViT-B/16, from measured rates and stated assumptions.

    python benchmarks/scale_model.py --out benchmarks/results/scale_model.json

Measured inputs: the CAFE stage/kernel benchmark (benchmarks/results/cafe_stage_cpu.json: CPU
seconds per iERF, per perturbed-image forward and of host work per exemplar, demo_resnet at
128 px), the H100 iERF kernel (benchmarks/results/ierf_masks_h100.json, demo_resnet), the CPU
ICAT benchmark (benchmarks/results/icat_cpu.json, all four methods), the forward FLOPs and
activation sizes of the three models, and the share of a full forward that a faithfulness
check's forward costs on each tapped layer (stopped at the layer, on its receptive-field crop)
(counted here with torch.utils.flop_counter, random weights, one image). ASSUMED (no GPU was available to this task) and listed in the JSON: the
H100 forward rates of ResNet-50 and ViT-B/16 and the matmul throughput of SAE training and
the scan. Every formula is in docs/scale.md; each stage's function below is one of them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.cafe.fieldcrop import field_crop  # noqa: E402
from pipeline.models import load_model, tap  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_IMAGES = 1_281_167          # ImageNet-1k train
LATENTS = 16_384              # per layer
EXEMPLARS = 32                # per latent, each with an iERF mask
CHECKED = 4                   # per latent with insertion / deletion curves (CafeOptions default)
STEPS = 16                    # faithfulness steps: 2 + 6 (steps - 1) = 92 forwards per check
ICAT_IMAGES = 10_000
GPUS = 8
TOP_PER_IMAGE = 32            # scan: activation rows (latents) per image and SAE
POSITIONS = 16                # extract: PFVs sampled per image and layer (README's cluster example)
# [assumption] H100 forward rates, float32 with TF32 convolutions / matmuls (what SRD runs in),
# eager PyTorch, large batches: ~40-50 TFLOP/s effective; uncertain by about 2x either way
H100_FORWARD_IMG_S = {"resnet50": 5000.0, "vit_base_patch16_224": 1500.0}
H100_MATMUL_FLOP_S = 100e12   # [assumption] dense TF32 matmuls of SAE training and the scan
SAE_TOKENS = 200e6            # [assumption] PFVs per SAE trained (e.g. 50k steps x 4096)
# the 4 tapped layers: (name, positions per image, channels) at 224 px
LAYERS = {
    "resnet50": [("layer1", 56 * 56, 256), ("layer2", 28 * 28, 512), ("layer3", 14 * 14, 1024),
                 ("layer4", 7 * 7, 2048)],
    "vit_base_patch16_224": [(f"blocks.{b}", 196, 768) for b in (2, 5, 8, 11)],
}


def model_facts(name: str) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) and the largest / total leaf-module output (floats)
    per image at the model's input size, random weights."""
    if name == "demo_resnet":
        model, size = load_model(name, None).model.eval(), 128
    else:
        model, size = timm.create_model(name, pretrained=False).eval(), 224
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(o.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return {"flops": counter.get_total_flops(), "size": size, "max_activation": max(sizes),
            "activations": sum(sizes),
            "params": sum(p.numel() for p in model.parameters())}


def check_fractions(name: str) -> dict[str, float]:
    """Per tapped layer: the FLOPs of one faithfulness forward as the cafe stage runs it (the
    forward stops at the layer, and reads only the receptive-field crop where
    `pipeline.cafe.fieldcrop` finds an exact one) over a full forward's, random weights at 224 px.
    ResNet-50 without timm's zero-initialised last BatchNorm of each residual branch: those
    zeros would make an untrained network's fields, and so its crops, far narrower than a
    trained one's."""
    kwargs = {"zero_init_last": False} if name.startswith("resnet") else {}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()

    def flops(run) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    full = flops(lambda: model(torch.randn(1, 3, 224, 224)))
    out = {}
    for layer, _, _ in LAYERS[name]:
        crop = field_crop(model, layer, (224, 224))
        size = crop.size if crop is not None else (224, 224)
        out[layer] = flops(lambda: tap(model, torch.randn(1, 3, *size), [layer])) / full
    return out


def cpu_rates(cafe: dict) -> dict[str, float]:
    """Per-exemplar costs of the CAFE stage in CPU seconds (demo_resnet, 128 px), from the
    stage/kernel benchmark run `after` (rates of the same code at the demo density)."""
    run = cafe["after"]
    parts = run["stage_breakdown_cpu_s"]
    forward = parts["faithfulness curves"] / (run["faithfulness_rows"] * (2 + 6 * (STEPS - 1)))
    ierf = run["kernel_cpu_s"] / run["exemplars"]
    host = (run["stage_cpu_s"] - parts["faithfulness curves"]
            - parts["iERF (batched_latent_ierfs)"] - parts["SRD pattern (srd.build)"]) / run["exemplars"]
    return {"forward_s": forward, "ierf_s": ierf, "ierf_in_forwards": ierf / forward,
            "host_s_per_exemplar": host}


def estimate(name: str, facts: dict, demo: dict, rates: dict, h100_kernel: list[float],
             icat_forwards: float, png_bytes_128: float, checks_at: dict[str, float]) -> dict:
    """GPU-seconds, storage and memory of every stage for one model (docs/scale.md §2);
    `checks_at`: `check_fractions` of the model."""
    fwd = 1.0 / H100_FORWARD_IMG_S[name]                       # GPU-s per forward
    layers = LAYERS[name]
    scale = facts["flops"] / demo["flops"]
    exemplars = len(layers) * LATENTS * EXEMPLARS
    checks = len(layers) * LATENTS * CHECKED
    per_check = 2 + 6 * (STEPS - 1)
    # iERF per exemplar on a GPU, two bases: (low) the CPU ratio iERF / forward times the
    # assumed forward rate; (high) the H100 demo kernel, slowed by the FLOPs ratio
    ierf_low = rates["ierf_in_forwards"] * fwd
    ierf_high = scale / min(h100_kernel)
    host = rates["host_s_per_exemplar"] * (facts["size"] / demo["size"]) ** 2
    gpu_s = {
        "extract": N_IMAGES * fwd * 1.08,          # 8% over a bare forward (pipeline-*.json)
        "train-sae": sum(SAE_TOKENS * 6 * c * LATENTS for _, _, c in layers) / H100_MATMUL_FLOP_S,
        "scan": sum(N_IMAGES * min(p, POSITIONS) * 2 * c * LATENTS
                    for _, p, c in layers) / H100_MATMUL_FLOP_S,
        "cafe_ierf_low": exemplars * ierf_low, "cafe_ierf_high": exemplars * ierf_high,
        # each check's forwards stop at the layer and read its crop (`check_fractions`)
        "cafe_faithfulness": sum(LATENTS * CHECKED * per_check * fwd * checks_at[layer]
                                 for layer, _, _ in layers),
        "cafe_faithfulness_full_forwards": checks * per_check * fwd,
        "icat": ICAT_IMAGES * icat_forwards * fwd * len(layers) / 2,  # demo: 2 pairs
    }
    host_s = {"cafe_png_masks_host": exemplars * host}
    summed = {k: v for k, v in gpu_s.items() if k != "cafe_faithfulness_full_forwards"}
    low = sum(v for k, v in summed.items() if k != "cafe_ierf_high")
    high = sum(v for k, v in summed.items() if k != "cafe_ierf_low")
    pfv_all = sum(p * c for _, p, c in layers) * 2 * N_IMAGES
    storage = {
        "shards (ImageNet JPEG)": 140e9,
        "pfv (float16, every position)": pfv_all,
        f"pfv (float16, {POSITIONS} positions per image and layer)": sum(
            min(p, POSITIONS) * c for _, p, c in layers) * 2 * N_IMAGES,
        "activations (scan)": N_IMAGES * len(layers) * TOP_PER_IMAGE * 8,
        "sae_weights": sum(2 * c * LATENTS * 4 for _, _, c in layers),
        "exemplars (iERF PNGs)": exemplars * (png_bytes_128 * (facts["size"] / 128) ** 2 + 100),
    }
    memory = {
        "extract (GPU, batch 64)": 64 * facts["activations"] * 4,
        "train-sae (GPU: weights, grads, Adam; batch 4096)": max(
            4 * 2 * c * LATENTS * 4 + 4096 * LATENTS * 4 * 2 for _, _, c in layers),
        "scan (GPU: batch_pfvs 16384 x latents)": 16384 * LATENTS * 4,
        # SRD: the recorded pattern of image_batch images plus seed_chunk relevance copies of
        # the largest activation for each of them (relevance goes layer by layer)
        "cafe (GPU: image_batch 8, seed_chunk 64)": 8 * facts["activations"] * 4 * 3
        + 8 * 64 * facts["max_activation"] * 4 * 3,
    }
    return {"flops_per_forward": facts["flops"], "flops_vs_demo": round(scale, 1),
            "exemplars": exemplars, "checked_exemplars": checks,
            "check_forward_fractions": {k: round(v, 4) for k, v in checks_at.items()},
            "gpu_s_per_exemplar": {"ierf_low": ierf_low, "ierf_high": ierf_high,
                                   "faithfulness": CHECKED / EXEMPLARS * per_check * fwd
                                   * sum(checks_at.values()) / len(checks_at)},
            "gpu_hours": {k: round(v / 3600, 2) for k, v in gpu_s.items()},
            "gpu_hours_total": [round(low / 3600, 1), round(high / 3600, 1)],
            "wall_hours_on_8_gpus": [round(low / 3600 / GPUS, 2), round(high / 3600 / GPUS, 2)],
            "host_cpu_hours": {k: round(v / 3600, 1) for k, v in host_s.items()},
            "storage_gb": {k: round(v / 1e9, 2) for k, v in storage.items()},
            "memory_gib": {k: round(v / 2**30, 2) for k, v in memory.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args()
    torch.set_num_threads(1)
    cafe = json.loads((RESULTS / "cafe_stage_cpu.json").read_text())
    h100 = json.loads((RESULTS / "ierf_masks_h100.json").read_text())
    rates = cpu_rates(cafe)
    h100_kernel = [v["batched_masks_per_s"] for v in h100["layers"].values()]
    # ICAT per image in forward-equivalents: CPU seconds per image of all four methods (ig at
    # 32 steps, grad x act + grad, srd) over both pairs of the demo atlas (layer2 -> layer4,
    # layer4 -> logits; benchmarks/results/icat_cpu.json), over the CPU forward time
    icat = json.loads((RESULTS / "icat_cpu.json").read_text())
    icat_cpu = sum(m["cpu_s"] for pair in icat["per_pair"].values() for m in pair.values())
    icat_forwards = icat_cpu / icat["images"] / rates["forward_s"]
    kept = pq_png_bytes(cafe)
    facts = {n: model_facts(n) for n in ("demo_resnet", "resnet50", "vit_base_patch16_224")}
    result = {
        "assumptions": {"h100_forward_img_s": H100_FORWARD_IMG_S,
                        "h100_matmul_flop_s": H100_MATMUL_FLOP_S, "sae_tokens": SAE_TOKENS},
        "atlas": {"images": N_IMAGES, "layers": 4, "latents_per_layer": LATENTS,
                  "exemplars_per_latent": EXEMPLARS, "checked_per_latent": CHECKED,
                  "faithfulness_steps": STEPS, "icat_images": ICAT_IMAGES, "gpus": GPUS,
                  "positions_per_image": POSITIONS},
        "measured_cpu": {**rates, "icat_forwards_per_image": icat_forwards,
                         "png_bytes_128px": kept, "h100_demo_kernel_masks_per_s": h100_kernel},
        "models": {n: {k: facts[n][k] for k in ("flops", "activations", "max_activation",
                                                 "params")} for n in facts},
        "estimates": {n: estimate(n, facts[n], facts["demo_resnet"], rates, h100_kernel,
                                  icat_forwards, kept, check_fractions(n))
                      for n in ("resnet50", "vit_base_patch16_224")},
    }
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def pq_png_bytes(cafe: dict) -> float:
    """Mean iERF PNG size at 128 px: recorded by the stage benchmark, else 3,380 B (measured on
    the demo atlas's exemplars, benchmarks/cafe_stage.py --keep)."""
    return float(cafe["after"].get("png_bytes_mean", 3380.0))


if __name__ == "__main__":
    main()
