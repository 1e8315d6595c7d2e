"""Where a ViT's SRD pixel map loses the class: the relevance after block 0, taken to the pixels
with and without the class token's share.

    python benchmarks/class_switch_block0.py \
        --model dinov2_shapes=pipeline/models/weights/dinov2_shapes_present.safetensors

On the class-switch scenes (`benchmarks/class_switch.py`), three pixel maps per (scene, class)
pair: SRD's own; the relevance on every token after `--layer` (default `blocks.0`) taken to the
pixels as a seed map (`srd.ierf`, ordinary ratios); the same with the class token's (and any
register's) share set to zero. Per map: the class-switch pointing score and the share of scenes
whose classes all peak in one cell (`metrics.one_peak_cell`, 1/16 of the side). If the prefix
tokens' share carried the class-independent part, the third map would follow the class where
the first does not. Also: how often SRD's own map peaks in one of its image's block-0 *hub*
patches, those whose attention contributions to the other patches have the largest summed norm
(`hub_patches`). Writes benchmarks/results/class_switch_block0.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.class_switch import SYNTHETIC_SEED, _load, scene_set  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402

import torch  # noqa: E402

from pipeline import srd  # noqa: E402
from pipeline.evaluation import metrics  # noqa: E402
from pipeline.srd.transformer import AttentionRule  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "class_switch_block0.json"
MAPS = ("SRD", "after the layer, to the pixels", "after the layer, prefix tokens zeroed")


def explainer(model: torch.nn.Module, layer: str):
    """(images, target) -> [B, len(MAPS) * H, W]: the maps of `MAPS`, stacked along the height
    (one SRD pass and one two-seed iERF pass per batch serve all three)."""
    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        res = srd.explain(model, x, t, layers=(layer,))
        seed = res.layers[layer].repeat(1, 2, 1)  # [B, 2, P], prefix tokens first
        seed[:, 1, :model.num_prefix_tokens] = 0
        return torch.cat([res.pixels[:, 0], *srd.ierf(model, x, layer, seed).unbind(1)], 1)
    return run


def block0_attention(model: torch.nn.Module, x: torch.Tensor) -> AttentionRule:
    """The attention rule SRD records for block 0 on these images (method.md §3.6): its frozen
    weights, value vectors and output projection, `c(i->j)` in closed form."""
    graph = srd.build(model, x)[0]
    block = next(b for b in graph.blocks if b.target == "blocks.0")
    return next(r for r in block.rules if isinstance(r, AttentionRule))


def hub_patches(model: torch.nn.Module, x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[N, k] the patches (index among the patches) whose block-0 attention contributions to the
    other patches have the largest summed norm `sum_j ||c(i->j)||` (SRD's pair norms), per image."""
    p = model.num_prefix_tokens
    return block0_attention(model, x).norms()[:, p:, p:].sum(1).topk(k, dim=1).indices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dinov2_shapes", metavar="MODEL[=WEIGHTS]", help="a ViT (as class_switch.py)")
    p.add_argument("--layer", default="blocks.0")
    p.add_argument("--scenes", type=int, default=128)
    p.add_argument("--seed", type=int, default=SYNTHETIC_SEED)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm, shown = _load(args.model)
    if not hasattr(lm.model, "num_prefix_tokens"):
        p.error(f"{args.model!r} is not a ViT with prefix tokens (a class token): nothing to zero")
    x, _, objects, cell = scene_set(lm, args.scenes, args.seed)
    size = x.shape[2:]
    t0 = time.perf_counter()
    stacked, masks, image = metrics.class_switch_maps(explainer(lm.model, args.layer), x, objects, args.batch)
    seconds = round(time.perf_counter() - t0, 1)
    rows = {}
    print(f"{'map':40s} {'pointing':>8s} {'one peak cell':>14s}")
    for kind, maps in zip(MAPS, stacked.unflatten(1, (len(MAPS), size[0])).unbind(1)):
        hits, stuck = metrics.pointing_game(maps, masks), metrics.one_peak_cell(maps, image, cell)
        rows[kind] = {"class_switch_pointing": float(hits.mean()), "scenes_with_one_peak_cell": float(stuck.float().mean())}
        print(f"{kind:40s} {rows[kind]['class_switch_pointing']:8.3f} {rows[kind]['scenes_with_one_peak_cell']:14.3f}")
    srd_maps = stacked[:, :size[0]]
    print(f"{seconds:.0f} s for the three maps")
    # where SRD's own map peaks: in one of its image's block-0 hub patches?
    grid = lm.model.patch_embed.grid_size[-1]
    patch = size[-1] // grid
    top = srd_maps.flatten(1).argmax(1)
    peak_patch = (top // size[-1] // patch) * grid + top % size[-1] // patch
    hubs = torch.cat([hub_patches(lm.model, x[lo:lo + args.batch]) for lo in range(0, len(x), args.batch)])
    on_hub = {f"top{k}": float((peak_patch[:, None] == hubs[image, :k]).any(1).float().mean()) for k in (1, 5)}
    chance = {f"top{k}": k / grid ** 2 for k in (1, 5)}
    print(f"SRD's peak in its image's block-0 hub patch: top-1 {on_hub['top1']:.3f}, top-5 {on_hub['top5']:.3f} "
          f"of the pairs (a patch at random: {chance['top1']:.4f}, {chance['top5']:.4f})")
    write_results(args.out, {"command": " ".join(sys.argv), "model": shown, "weights": lm.weights, "layer": args.layer,
                             "dataset_seed": args.seed, "scenes": len(x), "pairs": len(image), "peak_cell_px": cell,
                             "torch": torch.__version__, "threads": args.threads, "seconds": seconds, "maps": rows,
                             "srd_peak_in_a_block0_hub_patch": on_hub, "chance": chance})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
