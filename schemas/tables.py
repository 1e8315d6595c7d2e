"""Arrow schemas of the atlas tables written by the pipeline stages, and the schema version.

Layout of a build's output root (local path or fsspec URL), one folder per table, one Parquet
part per input shard (or per SAE) so a stage resumes part by part (ARCHITECTURE.md principle 2):

| path | table | written by |
|---|---|---|
| `images/part-NNNNNN.parquet` | IMAGES | extract |
| `layers/part-000000.parquet` | LAYERS | extract |
| `pfv/layer=L/part-NNNNNN.parquet` + `.npy` | PFV_IDS + a float16/32 array [rows, C] | extract |
| `errors/stage=S/part-NNNNNN.parquet` | ERRORS | every stage |
| `saes/part-SAE_ID.parquet` | SAES | train-sae |
| `sae_weights/SAE_ID.safetensors` + `.json` | (pipeline.sae format) | train-sae |
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
    pa.field("logit_agreement", pa.float64(), nullable=False),  # top-1, layer replaced
    pa.field("logit_kl", pa.float64(), nullable=False),  # KL(orig ‖ replaced), nats
    pa.field("model_accuracy", pa.float64()),  # top-1 of the unmodified model; null w/o labels
    pa.field("heldout_images", pa.int64(), nullable=False),
    pa.field("heldout_pfvs", pa.int64(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),  # path of the .safetensors, no suffix
    pa.field("config", pa.string(), nullable=False),  # JSON SAEConfig
])

TABLES: dict[str, pa.Schema] = {
    s.metadata[b"table"].decode(): s for s in (IMAGES, LAYERS, PFV_IDS, ERRORS, MANIFEST, SAES)
}
