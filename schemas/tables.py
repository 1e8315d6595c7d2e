"""Arrow schemas of the atlas tables written by the pipeline stages, and the schema version.

Layout of a build's output root (local path or fsspec URL), one folder per table, one Parquet
part per input shard (or per SAE) so a stage resumes part by part (docs/architecture.md, "Crash and resume"):

| path | table | written by |
|---|---|---|
| `images/part-NNNNNN.parquet` | IMAGES | extract |
| `layers/part-000000.parquet` | LAYERS | extract |
| `pfv/layer=L/part-NNNNNN.parquet` + `.npy` | PFV_IDS + a float16/32 array [rows, C] | extract |
| `errors/stage=S/part-NNNNNN.parquet` | ERRORS | every stage |
| `saes/part-SAE_ID.parquet` | SAES | train-sae |
| `sae_weights/SAE_ID.safetensors` + `.json` | (pipeline.sae format) | train-sae |
| `activations/sae=SAE_ID/part-NNNNNN.parquet` | ACTIVATIONS (sparse per-image top latents) | scan |
| `scan_parts/sae=SAE_ID/part-NNNNNN.npz` | per-part latent sketches the reduce merges | scan |
| `latent_stats/sae=SAE_ID/part-000000.parquet` | LATENT_STATS (reduce over all parts) | scan |
| `exemplar_picks/sae=SAE_ID/part-000000.parquet` | EXEMPLAR_PICKS (top-N + quantile picks) | scan |
| `exemplars/part-NNNNNN.parquet` | EXEMPLARS (picks with iERF masks + CAFE scores), one part per image shard | cafe |
| `index/…` | FAISS indexes (decoder directions, exemplar regions) + their id maps | index |
| `edges/…` | EDGES (ICAT) | icat |
| `manifest/stage=S/PART.json` | MANIFEST (one JSON record per finished part) | every stage |
| `stages/S.json` | the stage config whose hash every manifest record carries | every stage |

PFVs are dense vectors, so they live in `.npy` blocks beside narrow Parquet id tables
(principle 3): row i of `part-NNNNNN.parquet` is row i of `part-NNNNNN.npy`. DuckDB reads the
id tables; SAE training and scans read the arrays (memory-mapped locally).

Every atlas table carries `atlas_id` (the build's name) so atlases can be unioned; the schema
metadata holds `table` and `schema_version`.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1


def _schema(table: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"table": table, "schema_version": str(SCHEMA_VERSION)})


IMAGES = _schema("images", [
    pa.field("atlas_id", pa.string(), nullable=False),
    # part index * 1_000_000 + index of the sample in its shard: unique and readable
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("label", pa.int32()),  # null when the sample has no .cls
    pa.field("width", pa.int32(), nullable=False),  # of the decoded image, before preprocessing
    pa.field("height", pa.int32(), nullable=False),
    # the file the sample was cut from (its `.json` "source", as make-shards writes it), else
    # null; crops of one photo share it
    pa.field("source", pa.string()),
    # 64-bit difference hash of the decoded image (pipeline.data.images.dhash): near-duplicates
    # (re-encodings, resizes) share it
    pa.field("phash", pa.int64()),
])

LAYERS = _schema("layers", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("layer", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # "cnn" map or "vit" tokens
    pa.field("channels", pa.int32(), nullable=False),
    pa.field("grid_h", pa.int32(), nullable=False),
    pa.field("grid_w", pa.int32(), nullable=False),
    # prefix tokens (CLS, registers) before the grid; position p >= num_special is the grid cell
    # divmod(p - num_special, grid_w)
    pa.field("num_special", pa.int32(), nullable=False),
    pa.field("positions_per_image", pa.int32(), nullable=False),  # stored PFVs per image
])

PFV_IDS = _schema("pfv_ids", [
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),  # index into the layer's [P] PFV layout
])

ERRORS = _schema("errors", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),  # "" for a whole shard
    pa.field("reason", pa.string(), nullable=False),
])

MANIFEST = _schema("manifest", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("part", pa.string(), nullable=False),
    pa.field("input", pa.string(), nullable=False),  # the shard (or SAE run) the part came from
    pa.field("input_fingerprint", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("rows", pa.int64(), nullable=False),  # images of the part, or 1 per SAE
    pa.field("outputs", pa.string(), nullable=False),  # JSON {output table or file: rows}
    pa.field("errors", pa.int64(), nullable=False),
    pa.field("worker", pa.string(), nullable=False),  # host:pid that produced the part
    pa.field("started", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("finished", pa.timestamp("ms", tz="UTC"), nullable=False),
])

SAES = _schema("saes", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("layer", pa.string(), nullable=False),
    pa.field("sae_id", pa.string(), nullable=False),
    pa.field("variant", pa.string(), nullable=False),
    pa.field("d_in", pa.int32(), nullable=False),
    pa.field("n_latents", pa.int32(), nullable=False),
    pa.field("k", pa.int32(), nullable=False),
    pa.field("steps", pa.int64(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),  # PFVs trained on (all workers)
    pa.field("fvu", pa.float64(), nullable=False),  # held-out PFVs
    pa.field("l0", pa.float64(), nullable=False),
    pa.field("dead_frac", pa.float64(), nullable=False),
    pa.field("dense_frac", pa.float64(), nullable=False),
    # top-1 agreement and KL with the layer replaced; null for a model without a class head
    pa.field("logit_agreement", pa.float64()),
    pa.field("logit_kl", pa.float64()),  # KL(orig ‖ replaced), nats
    pa.field("model_accuracy", pa.float64()),  # top-1 of the unmodified model; null w/o labels
    pa.field("heldout_images", pa.int64(), nullable=False),
    pa.field("heldout_pfvs", pa.int64(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),  # path of the .safetensors, no suffix
    pa.field("config", pa.string(), nullable=False),  # JSON SAEConfig
])

# --- scan stage: SAE latents over every stored PFV (docs/method.md §§5-6) ---

ACTIVATIONS = _schema("activations", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("layer", pa.string(), nullable=False),
    pa.field("sae_id", pa.string(), nullable=False),
    pa.field("latent", pa.int32(), nullable=False),
    pa.field("max_act", pa.float32(), nullable=False),  # max over the image's positions
    pa.field("position", pa.int32(), nullable=False),  # argmax, in the layer's [P] layout
    pa.field("y", pa.int32(), nullable=False),  # grid cell of `position`; -1 for special tokens
    pa.field("x", pa.int32(), nullable=False),
    pa.field("rank", pa.int16(), nullable=False),  # 0 = the image's strongest latent
])

LATENT_STATS = _schema("latent_stats", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("layer", pa.string(), nullable=False),
    pa.field("sae_id", pa.string(), nullable=False),
    pa.field("latent", pa.int32(), nullable=False),
    pa.field("freq", pa.float64(), nullable=False),  # fraction of PFVs where the latent is > 0
    pa.field("image_freq", pa.float64(), nullable=False),  # fraction of images where it fires
    pa.field("mean_act", pa.float64(), nullable=False),  # mean over the PFVs where it fires
    pa.field("max_act", pa.float64(), nullable=False),
    pa.field("dead", pa.bool_(), nullable=False),  # never fired on the scanned PFVs
    pa.field("n_pfvs", pa.int64(), nullable=False),  # PFVs scanned
    pa.field("n_images", pa.int64(), nullable=False),
])

EXEMPLAR_PICKS = _schema("exemplar_picks", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("layer", pa.string(), nullable=False),
    pa.field("sae_id", pa.string(), nullable=False),
    pa.field("latent", pa.int32(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # "top" (top-N by activation) or "quantile"
    pa.field("rank", pa.int32(), nullable=False),  # 0 = strongest within (latent, kind)
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("activation", pa.float32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("y", pa.int32(), nullable=False),
    pa.field("x", pa.int32(), nullable=False),
    # the image's source group: crops and near-duplicates of one photo share it (the smallest
    # image_id among them; docs/method.md §5); the scan keeps at most `per_source` top picks each
    pa.field("source_group", pa.int64(), nullable=False),
])

# --- cafe stage: an exemplar pick with its latent iERF and faithfulness scores ---

EXEMPLARS = _schema("exemplars", [
    *EXEMPLAR_PICKS,
    pa.field("ierf_png", pa.binary(), nullable=False),  # 8-bit PNG at input resolution
    pa.field("bbox", pa.list_(pa.int32(), 4)),  # x0, y0, x1, y1 of the mask; null if empty
    pa.field("mask_frac", pa.float32(), nullable=False),  # mask area / image area
    pa.field("act_overlap", pa.float32(), nullable=False),  # IoU mask vs upsampled act map
    pa.field("ierf_constant", pa.float32(), nullable=False),  # share of pre-act. with no pixel source
    pa.field("ins_auc_ierf", pa.float32()),  # CAFE insertion/deletion AUCs (null: not run)
    pa.field("del_auc_ierf", pa.float32()),
    pa.field("ins_auc_act", pa.float32()),
    pa.field("del_auc_act", pa.float32()),
    pa.field("ins_auc_random", pa.float32()),
    pa.field("del_auc_random", pa.float32()),
    pa.field("gt_shape", pa.string()),  # synthetic data: the object the iERF mask hits most
    pa.field("gt_colour", pa.string()),
    pa.field("gt_texture", pa.string()),
    pa.field("gt_iou_ierf", pa.float32()),  # IoU of the iERF mask with that object's mask
    pa.field("gt_iou_act", pa.float32()),  # IoU of the thresholded activation map with it
])

# --- icat stage: the interlayer concept graph (docs/method.md §7) ---

EDGES = _schema("edges", [
    pa.field("atlas_id", pa.string(), nullable=False),
    pa.field("src_layer", pa.string(), nullable=False),
    pa.field("src_latent", pa.int32(), nullable=False),  # -1 = the layer's error node
    pa.field("dst_layer", pa.string(), nullable=False),  # "logits" for the class head
    pa.field("dst_latent", pa.int32(), nullable=False),  # class index when dst is "logits"
    pa.field("method", pa.string(), nullable=False),  # ig | grad_x_act | grad | srd
    pa.field("scope", pa.string(), nullable=False),  # "all" or "class=C"
    pa.field("weight", pa.float64(), nullable=False),  # sum over images
    pa.field("n_images", pa.int64(), nullable=False),  # images where the edge was non-zero
])

TABLES: dict[str, pa.Schema] = {
    s.metadata[b"table"].decode(): s
    for s in (IMAGES, LAYERS, PFV_IDS, ERRORS, MANIFEST, SAES, ACTIVATIONS, LATENT_STATS,
              EXEMPLAR_PICKS, EXEMPLARS, EDGES)
}
