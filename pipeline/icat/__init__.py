"""ICAT: interlayer concept attribution between SAE latents of tapped layers (docs/method.md §7).

    seg = Segment(model, "layer2", "layer4")               # F_ab, only the modules in between
    dec = Decomposed.of(LayerSAE("layer2", sae2, positions), pfvs2)   # x = dec(a) + err
    readout = Readout(LayerSAE("layer4", sae4, positions4))           # g = latent of lb's SAE
    image, node, mask = downstream_rows(seg, dec, images, readout)
    scores = attribute(seg, dec, readout, image, node, mask, images)  # ig, grad_x_act, grad

Modules: `segment` (pair isolation), `attribution` (gradient methods), `srd_scores` (the SRD
sharing-ratio variant), `aggregate` (sums, counts, scopes, top incoming edges), `stage` (the
icat stage: map over shards, reduce to `edges`; jobs/icat.py is its Ray driver), `protocol`
(interlayer insertion/deletion).
"""
from pipeline.icat.aggregate import combine, edge_rows, top_incoming
from pipeline.icat.attribution import (
    METHODS,
    Decomposed,
    LayerSAE,
    PairScores,
    Readout,
    attribute,
    downstream_rows,
    quadrature,
)
from pipeline.icat.segment import LOGITS, HookSegment, Segment
from pipeline.icat.srd_scores import srd_scores

__all__ = [
    "LOGITS", "METHODS", "Decomposed", "HookSegment", "LayerSAE", "PairScores", "Readout",
    "Segment", "attribute", "combine", "downstream_rows", "edge_rows", "quadrature",
    "srd_scores", "top_incoming",
]
