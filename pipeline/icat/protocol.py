"""Interlayer insertion/deletion protocol: how faithful is each ICAT method (docs/method.md §7).

For a downstream node g of an image (a latent of lb's SAE, or a class logit), each method
ranks the upstream latents of la that are active in the image by their score (largest signed
score first: **[choice]** the latents that push g up come first, as in pixel insertion/deletion).
Deletion zeroes them cumulatively in that order in `x = dec(a) + err`; insertion starts from
`dec(0) + err` and adds them in that order; after each step g is read through F_ab with the
same frozen readout as the scores (pipeline.icat.attribution). The error term stays in place
in both curves (the protocol measures the ranking of the latents, as ICAT-IG's default path).

Curves are sampled at `points + 1` evenly spaced fractions of the image's active latents and
normalised by g(x); the AUC is the trapezoid mean over the fraction in [0, 1]. A faithful
ranking has a high insertion AUC and a low deletion AUC. The random baseline averages
`random_orders` seeded permutations.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.icat.attribution import Decomposed, Readout
from pipeline.icat.segment import Segment
from pipeline.icat.stage import ICATOptions, ShardScorer, plan_icat, sample_images
from pipeline.pfv.extract import decode_shard
from pipeline.store import fs

RANDOM = "random"


@dataclass
class Curves:
    """Insertion and deletion curves of one (image, node) row per ranking: [points + 1] each,
    normalised by the node's value at the input."""

    insertion: dict[str, np.ndarray]
    deletion: dict[str, np.ndarray]


def auc(curve: np.ndarray) -> float:
    """Trapezoid area under a curve sampled evenly on [0, 1]."""
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1))) if len(curve) > 1 else float(curve[0])


@torch.no_grad()
def curves(segment: Segment, dec: Decomposed, readout: Readout, row_image: int, node: int,
           mask: Tensor | None, scores: dict[str, Tensor], images: Tensor | None = None, *,
           points: int = 16, random_orders: int = 3, seed: int = 0,
           batch_size: int = 64) -> Curves:
    """Insertion/deletion curves of one row for each method's ranking and a random one.

    scores: {method: Tensor[F (+1)]} this row's scores (an error column is ignored).
    """
    acts = dec.acts[row_image]  # [P_s, F]
    active = (acts > 0).any(0).nonzero()[:, 0]
    if len(active) == 0:
        raise ValueError(f"image {row_image} has no active upstream latent")
    counts = np.linspace(0, len(active), points + 1).round().astype(np.int64)
    orders = {m: active[s[:acts.shape[1]][active].argsort(descending=True, stable=True)]
              for m, s in scores.items()}
    gen = torch.Generator().manual_seed(seed + 7919 * row_image + node)
    randoms = [active[torch.randperm(len(active), generator=gen).to(active.device)]
               for _ in range(random_orders)]
    value = _values(segment, dec, readout, row_image, node, mask, acts[None], images, batch_size)[0]
    denom = value if value.abs() > 1e-12 else torch.ones_like(value)
    ins, dele = {}, {}
    for name, order_list in [(m, [o]) for m, o in orders.items()] + [(RANDOM, randoms)]:
        c_ins, c_del = [], []
        for order in order_list:
            rank = torch.empty(acts.shape[1], dtype=torch.long, device=acts.device).fill_(len(active))
            rank[order] = torch.arange(len(order), device=acts.device)
            # kept[k, f]: latent f among the first counts[k] of the order
            first = rank[None, :] < torch.as_tensor(counts, device=acts.device)[:, None]
            inserted = acts[None] * first[:, None, :]
            deleted = acts[None] * ~first[:, None, :]
            c_ins.append(_values(segment, dec, readout, row_image, node, mask, inserted, images,
                                 batch_size) / denom)
            c_del.append(_values(segment, dec, readout, row_image, node, mask, deleted, images,
                                 batch_size) / denom)
        ins[name] = torch.stack(c_ins).mean(0).double().cpu().numpy()
        dele[name] = torch.stack(c_del).mean(0).double().cpu().numpy()
    return Curves(ins, dele)


def _values(segment: Segment, dec: Decomposed, readout: Readout, row_image: int, node: int,
            mask: Tensor | None, acts: Tensor, images: Tensor | None, batch_size: int) -> Tensor:
    """g for K variants of one image's latents acts [K, P_s, F] (error term fixed) -> [K]."""
    up, out = dec.up, []
    for lo in range(0, acts.shape[0], batch_size):
        a = acts[lo:lo + batch_size]
        k = a.shape[0]
        full = dec.pfvs[row_image].expand(k, *dec.pfvs.shape[1:]).clone()
        full[:, up.positions] = up.sae.decode(a).to(full.dtype) + dec.err[row_image]
        y = segment(full, None if images is None else images[row_image].expand(k, *images.shape[1:]))
        nodes = torch.full((k,), node, dtype=torch.long, device=a.device)
        out.append(readout(y, nodes, None if mask is None else mask.expand(k, -1)))
    return torch.cat(out)


def evaluate(root: str, options: ICATOptions, *, images: int = 32, rows_per_image: int = 2,
             points: int = 16, random_orders: int = 3, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Run the protocol on an atlas (read-only): mean AUCs per layer pair and ranking.

    images: scored images, spread evenly over the extracted shards; rows_per_image: downstream
    nodes sampled per image and pair (seeded). Returns {"pairs": {pair: {method: {ins_auc,
    del_auc, ins_sem, del_sem, rows}}}, "ig_completeness": max |sum - (g(x) - g(b))| / |g(x)|, ...}.
    """
    plan = plan_icat(root, options, record=False)
    scorer = ShardScorer(plan)
    per_shard = -(-images // len(plan.tasks))
    aucs: dict[str, dict[str, dict[str, list[float]]]] = {}
    completeness: list[float] = []
    n_images = 0
    bar = tqdm(total=images, unit="img", desc="icat protocol", disable=not progress)
    for task in plan.tasks:
        if n_images >= images:
            break
        decoded = decode_shard(task.shard, plan.data_config)
        take = sample_images(len(decoded.keys), min(per_shard, images - n_images))
        pixels = torch.as_tensor(decoded.pixels[take], device=scorer.loaded.device)
        labels = decoded.labels[take]
        for pair in plan.pairs:
            res = scorer.score_pair(pair, pixels, labels, rows_per_image=rows_per_image,
                                    seed=seed + task.index)
            if "ig" in res.scores:
                ig = res.scores["ig"]
                target = ig.value - ig.baseline if options.scale_error else ig.value
                rel = (ig.scores["ig"].sum(1) - target).abs() / ig.value.abs().clamp_min(1e-12)
                completeness.extend(rel.tolist())
            per = aucs.setdefault(f"{pair[0]}->{pair[1]}", {})
            for q in range(len(res.image)):
                c = curves(res.segment, res.dec, res.readout, int(res.image[q]), int(res.node[q]),
                           None if res.mask is None else res.mask[q:q + 1],
                           {m: s.scores[m][q] for m, s in res.scores.items()}, pixels,
                           points=points, random_orders=random_orders, seed=seed)
                for name in c.insertion:
                    d = per.setdefault(name, {"ins": [], "del": []})
                    d["ins"].append(auc(c.insertion[name]))
                    d["del"].append(auc(c.deletion[name]))
        n_images += len(take)
        bar.update(len(take))
    bar.close()
    return {
        "root": root, "images": n_images, "rows_per_image": rows_per_image, "points": points,
        "random_orders": random_orders, "steps": options.steps, "rule": options.rule,
        "scale_error": options.scale_error, "seed": seed,
        "ig_completeness_max_rel": max(completeness) if completeness else None,
        "ig_completeness_median_rel": float(np.median(completeness)) if completeness else None,
        "pairs": {pair: {name: _stats(d) for name, d in per.items()} for pair, per in aucs.items()},
    }


def _stats(d: dict[str, list[float]]) -> dict[str, float]:
    ins, dele = np.asarray(d["ins"]), np.asarray(d["del"])
    sem = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
    return {"ins_auc": float(ins.mean()), "ins_sem": sem(ins), "del_auc": float(dele.mean()),
            "del_sem": sem(dele), "rows": int(len(ins))}


def markdown(result: dict[str, Any]) -> str:
    """The AUC table of `evaluate` as Markdown (best ranking per column in bold)."""
    lines = ["| pair | ranking | insertion AUC ↑ | deletion AUC ↓ | rows |", "|---|---|---|---|---|"]
    for pair, per in result["pairs"].items():
        best_ins = max(per, key=lambda m: per[m]["ins_auc"])
        best_del = min(per, key=lambda m: per[m]["del_auc"])
        for name, st in per.items():
            ins = f"{st['ins_auc']:.3f} ± {st['ins_sem']:.3f}"
            dele = f"{st['del_auc']:.3f} ± {st['del_sem']:.3f}"
            lines.append(f"| {pair} | {name} | {f'**{ins}**' if name == best_ins else ins} | "
                         f"{f'**{dele}**' if name == best_del else dele} | {st['rows']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.icat.protocol ROOT`: run the protocol, print the table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m pipeline.icat.protocol", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="atlas root after extract and train-sae (read only)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--rows-per-image", type=int, default=2)
    p.add_argument("--points", type=int, default=16)
    p.add_argument("--random-orders", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    result = evaluate(a.root, ICATOptions(steps=a.steps, images_per_shard=None), images=a.images,
                      rows_per_image=a.rows_per_image, points=a.points,
                      random_orders=a.random_orders, seed=a.seed)
    print(markdown(result))
    print(f"IG completeness |sum - g| / |g|: max {result['ig_completeness_max_rel']:.2e}, "
          f"median {result['ig_completeness_median_rel']:.2e}")
    if a.json:
        fs.write_json(result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
