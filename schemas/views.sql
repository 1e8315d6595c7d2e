-- DuckDB views of an atlas: stable names over the Parquet parts of every table.
--
-- `pipeline.atlas.views.connect` fills the placeholders before running this file:
--   ${TABLE}         the table's parts, read with
--                    read_parquet('ROOT/TABLE/**/*.parquet', hive_partitioning = true, ...);
--                    for a table with no files in this atlas, a one-row relation of typed
--                    NULLs whose WHERE clause raises "table TABLE is not in this atlas (...);
--                    run stage S" - so the atlas opens without it and only a query that
--                    reads it fails, naming the stage that writes it
--   ${exemplars_or_empty}  the exemplars view, or an empty relation of its columns while the
--                    cafe stage has not run (the `latents` view works from the scan alone)
--   ${atlas_id}      the atlas name as a SQL string literal
--
-- Each view selects its schema's columns explicitly (schemas/tables.py), so a query sees the
-- same columns whatever the folder layout. Hive folders (`layer=L/`, `stage=S/`, `sae=ID/`) give
-- the partition column where the files lack it (pfv's `layer`); for the other tables the
-- column is in the files too, and a filter on it skips row groups by their statistics.

CREATE VIEW images AS
SELECT atlas_id, image_id, shard, key, label, width, height FROM ${images};

CREATE VIEW layers AS
SELECT atlas_id, layer, kind, channels, grid_h, grid_w, num_special, positions_per_image
FROM ${layers};

CREATE VIEW saes AS
SELECT atlas_id, layer, sae_id, variant, d_in, n_latents, k, steps, tokens, fvu, l0, dead_frac,
       dense_frac, logit_agreement, logit_kl, model_accuracy, heldout_images, heldout_pfvs,
       weights, config
FROM ${saes};

CREATE VIEW errors AS
SELECT atlas_id, stage, shard, key, reason FROM ${errors};

-- One row per committed part of every stage (the JSON records of manifest/stage=S/).
CREATE VIEW manifest AS
SELECT ${atlas_id} AS atlas_id, stage, part, input, input_fingerprint, config_hash, rows,
       CAST(outputs AS VARCHAR) AS outputs, errors, worker,
       to_timestamp(started) AS started, to_timestamp(finished) AS finished
FROM ${manifest};

-- The id table of every stored PFV: row `row` of pfv/layer=LAYER/PART.parquet is row `row`
-- of PART.npy (the vectors themselves never go through DuckDB).
CREATE VIEW pfv AS
SELECT layer, image_id, position,
       regexp_extract(filename, '(part-[^/]+)\.parquet$', 1) AS part,
       file_row_number AS row
FROM ${pfv};

CREATE VIEW activations AS
SELECT atlas_id, image_id, layer, sae_id, latent, max_act, position, y, x, rank
FROM ${activations};

CREATE VIEW latent_stats AS
SELECT atlas_id, layer, sae_id, latent, freq, image_freq, mean_act, max_act, dead, n_pfvs,
       n_images
FROM ${latent_stats};

CREATE VIEW exemplar_picks AS
SELECT atlas_id, layer, sae_id, latent, kind, rank, image_id, activation, position, y, x
FROM ${exemplar_picks};

CREATE VIEW exemplars AS
SELECT atlas_id, layer, sae_id, latent, kind, rank, image_id, activation, position, y, x,
       ierf_png, bbox, mask_frac, act_overlap, ierf_constant,
       ins_auc_ierf, del_auc_ierf, ins_auc_act, del_auc_act, ins_auc_random, del_auc_random,
       gt_shape, gt_colour, gt_texture, gt_iou_ierf, gt_iou_act
FROM ${exemplars};

CREATE VIEW edges AS
SELECT atlas_id, src_layer, src_latent, dst_layer, dst_latent, method, scope, weight, n_images
FROM ${edges};

-- One row per SAE latent: the scan's statistics plus aggregates of its CAFE exemplars.
-- [choice] The aggregates run over the latent's `top` exemplars only (the top-N by
-- activation, which define what the latent stands for); the quantile picks stay in
-- `exemplars` for queries about weaker activations. CAFE AUCs are means over those exemplars:
-- cafe_ins_auc / cafe_del_auc are the iERF-ordered AUCs (docs/method.md §6), *_act and
-- *_random the activation-ordered and random-ordered baselines; `cafe_faithful` says whether
-- the iERF order beat the activation order on both (higher insertion, lower deletion).
-- label_hint is the most common ground-truth concept "colour texture shape" among the top
-- exemplars (ties: alphabetical), label_hint_frac the share of top exemplars that carry it.
-- Before the cafe stage every exemplar column is NULL and n_exemplars is 0.
CREATE VIEW latents AS
WITH top AS (
    SELECT * FROM ${exemplars_or_empty} WHERE kind = 'top'
),
per_latent AS (
    SELECT sae_id, latent, count(*) AS n_exemplars,
           avg(ins_auc_ierf) AS cafe_ins_auc, avg(del_auc_ierf) AS cafe_del_auc,
           avg(ins_auc_act) AS ins_auc_act, avg(del_auc_act) AS del_auc_act,
           avg(ins_auc_random) AS ins_auc_random, avg(del_auc_random) AS del_auc_random,
           avg(mask_frac) AS mask_frac, avg(act_overlap) AS act_overlap,
           avg(gt_iou_ierf) AS gt_iou_ierf, avg(gt_iou_act) AS gt_iou_act
    FROM top GROUP BY sae_id, latent
),
concepts AS (
    SELECT sae_id, latent, concat_ws(' ', gt_colour, gt_texture, gt_shape) AS concept,
           count(*) AS n
    FROM top
    WHERE coalesce(gt_colour, gt_texture, gt_shape) IS NOT NULL
    GROUP BY ALL
),
hint AS (
    SELECT sae_id, latent, concept, n FROM concepts
    QUALIFY row_number() OVER (PARTITION BY sae_id, latent ORDER BY n DESC, concept) = 1
)
SELECT s.atlas_id, s.layer, s.sae_id, s.latent, s.freq, s.image_freq, s.mean_act, s.max_act,
       s.dead, s.n_pfvs, s.n_images,
       coalesce(p.n_exemplars, 0) AS n_exemplars,
       h.concept AS label_hint,
       h.n / p.n_exemplars AS label_hint_frac,
       p.cafe_ins_auc, p.cafe_del_auc, p.ins_auc_act, p.del_auc_act,
       p.ins_auc_random, p.del_auc_random,
       p.cafe_ins_auc > p.ins_auc_act AND p.cafe_del_auc < p.del_auc_act AS cafe_faithful,
       p.mask_frac, p.act_overlap, p.gt_iou_ierf, p.gt_iou_act
FROM latent_stats s
LEFT JOIN per_latent p ON p.sae_id = s.sae_id AND p.latent = s.latent
LEFT JOIN hint h ON h.sae_id = s.sae_id AND h.latent = s.latent;
