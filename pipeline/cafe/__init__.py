"""CAFE exemplars: latent iERF masks, their PNG encoding and statistics, insertion / deletion
faithfulness, and ground-truth IoU on the synthetic data (docs/method.md §§4, 6).

    masks        mass masks, the 8-bit PNG (mask == png >= 128), bbox, IoU, activation maps
    ierf         latent iERFs of many exemplars per recorded image batch
    faithfulness patch orders, insertion / deletion curves, AUCs
    groundtruth  the synthetic object an iERF mask lands on
    stage        the stage, Ray-free: options, plan, the per-part worker (driver: jobs/cafe.py)
"""
from pipeline.cafe.masks import bbox, decode_png, encode_png, iou, mask_from_png, mass_masks
from pipeline.cafe.stage import STAGE, CafeOptions, CafePlan, CafeTask, CafeWorker, plan_cafe

__all__ = ["STAGE", "CafeOptions", "CafePlan", "CafeTask", "CafeWorker", "bbox", "decode_png",
           "encode_png", "iou", "mask_from_png", "mass_masks", "plan_cafe"]
