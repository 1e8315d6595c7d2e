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

from benchmarks.class_switch import SYNTHETIC_SEED, _load  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import srd  # noqa: E402
from pipeline.evaluation import metrics  # noqa: E402
from pipeline.evaluation.data import multi_object_set  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "class_switch_block0.json"
MAPS = ("SRD", "after the layer, to the pixels", "after the layer, prefix tokens zeroed")


def explainer(model: torch.nn.Module, layer: str, kind: str):
    """(images, target) -> [B, H, W] pixel maps of one of `MAPS`."""
    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        res = srd.explain(model, x, t, layers=(layer,))
        if kind == MAPS[0]:
            return res.pixels[:, 0]
        seed = res.layers[layer].clone()  # [B, 1, P], prefix tokens first
        if kind == MAPS[2]:
            seed[:, :, :model.num_prefix_tokens] = 0
        return srd.ierf(model, x, layer, seed)[:, 0]
    return run


@torch.no_grad()
def block0_contributions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, T, T, C]: `c(i->j) = sum_h A^h_ji W_O^h v^h_i` of block 0's attention (method.md §3.6,
    layer scale applied), target j then source i over all tokens, prefix first; summed over i
    plus the projection's bias (scaled likewise) it is the attention branch's output."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    blk, attn = model.blocks[0], model.blocks[0].attn
    h = blk.norm1(t)
    n, tokens, width = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).reshape(n, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    a = ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(-1)  # [N, H, j, i]
    out = blk.ls1(torch.einsum("chd,nhid->nhic", attn.proj.weight.view(width, heads, -1), v))
    return torch.einsum("nhji,nhic->njic", a, out)


def hub_patches(model: torch.nn.Module, x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[N, k] the patches (index among the patches) whose block-0 attention contributions to the
    other patches have the largest summed norm `sum_j ||c(i->j)||`, per image."""
    p = model.num_prefix_tokens
    return block0_contributions(model, x)[:, p:, p:].norm(dim=-1).sum(1).topk(k, dim=1).indices


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
    imgs, objs = multi_object_set(args.scenes, args.seed)
    x = torch.stack([lm.transform(Image.fromarray(im)) for im in imgs])
    size = x.shape[2:]
    cell = max(1, size[-1] // 16)
    objects = [[(c, torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), size=size,
                                                     mode="nearest")[0, 0] > 0.5) for c, m in per] for per in objs]
    rows, srd_maps = {}, None
    print(f"{'map':40s} {'pointing':>8s} {'one peak cell':>14s} {'seconds':>8s}")
    for kind in MAPS:
        t0 = time.perf_counter()
        maps, masks, image = metrics.class_switch_maps(explainer(lm.model, args.layer, kind), x, objects, args.batch)
        hits, stuck = metrics.pointing_game(maps, masks), metrics.one_peak_cell(maps, image, cell)
        srd_maps = maps if kind == MAPS[0] else srd_maps
        rows[kind] = {"class_switch_pointing": float(hits.mean()), "scenes_with_one_peak_cell": float(stuck.float().mean()),
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{kind:40s} {rows[kind]['class_switch_pointing']:8.3f} {rows[kind]['scenes_with_one_peak_cell']:14.3f} "
              f"{rows[kind]['seconds']:8.0f}", flush=True)
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
                             "torch": torch.__version__, "threads": args.threads, "maps": rows,
                             "srd_peak_in_a_block0_hub_patch": on_hub, "chance": chance})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
