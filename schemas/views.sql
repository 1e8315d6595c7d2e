-- DuckDB views of an atlas: stable names over the Parquet parts of every table.
--
-- `pipeline.atlas.views.connect` fills the placeholders before running this file:
--   ${TABLE}         the table's parts, read with
--                    read_parquet('ROOT/TABLE/**/*.parquet', hive_partitioning = true, ...);
--                    for a table with no files in this atlas, a one-row relation of typed
--                    NULLs whose WHERE clause raises "table TABLE is not in this atlas (...);
--                    run stage S" - so the atlas opens without it and only a query that
--                    reads it fails, naming the stage that writes it
--   ${TABLE_or_empty}  the TABLE view, or an empty relation of its columns while the stage
--                    that writes it has not run (the `latents` view works from the scan alone)
--   ${label_names}   (label, name) of the data's labels (dataset.json), ${class_names}
--                    (class, name) of the model's classes, ${icat_saes} (layer, sae_id) of the
--                    SAEs the icat stage connected: VALUES relations, empty when unknown
--   ${atlas_id}      the atlas name as a SQL string literal
--
-- Each view selects its schema's columns explicitly (schemas/tables.py), so a query sees the
-- same columns whatever the folder layout. Hive folders (`layer=L/`, `stage=S/`, `sae=ID/`) give
-- the partition column where the files lack it (pfv's `layer`); for the other tables the
-- column is in the files too, and a filter on it skips row groups by their statistics.

CREATE VIEW images AS
SELECT atlas_id, image_id, shard, key, label, width, height, source, phash FROM ${images};

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
SELECT atlas_id, layer, sae_id, latent, kind, rank, image_id, activation, position, y, x,
       source_group
FROM ${exemplar_picks};

CREATE VIEW exemplars AS
SELECT atlas_id, layer, sae_id, latent, kind, rank, image_id, activation, position, y, x,
       source_group, ierf_png, bbox, mask_frac, act_overlap, ierf_constant,
       ins_auc_ierf, del_auc_ierf, ins_auc_act, del_auc_act, ins_auc_random, del_auc_random,
       gt_shape, gt_colour, gt_texture, gt_iou_ierf, gt_iou_act
FROM ${exemplars};

CREATE VIEW edges AS
SELECT atlas_id, src_layer, src_latent, dst_layer, dst_latent, method, scope, weight, n_images
FROM ${edges};

-- The names of the model's output classes (`class` = the logit index, as edges.dst_latent
-- when dst_layer = 'logits') and of the data's labels (`label`, as images.label); empty when
-- the atlas does not know them (pipeline.store.AtlasRoot.class_names / label_names).
CREATE VIEW classes AS SELECT class, name FROM ${class_names};

CREATE VIEW labels AS SELECT label, name FROM ${label_names};

-- One row per SAE latent: the scan's statistics, the diversity of its top picks, a label hint
-- with its evidence, and aggregates of its CAFE exemplars (docs/atlas.md lists the columns).
-- [choice] The aggregates run over the latent's `top` exemplars only (the top-N by
-- activation, which define what the latent stands for); the quantile picks stay in
-- `exemplars` for queries about weaker activations. CAFE AUCs are means over those exemplars:
-- cafe_ins_auc / cafe_del_auc are the iERF-ordered AUCs (docs/method.md §6), *_act and
-- *_random the activation-ordered and random-ordered baselines; `cafe_faithful` says whether
-- the iERF order beat the activation order on both (higher insertion, lower deletion).
-- Diversity: n_top_images distinct images and n_sources distinct source groups (crops and
-- near-duplicates of one photo, docs/method.md §5) among the top picks.
-- The label hint, first found (docs/method.md §5), with label_source saying which:
--   'ground truth'  synthetic data: per attribute (colour, texture, shape) its most common
--                   value among the top exemplars; the hint lists the attributes held by at
--                   least half of them ("texture=checker colour=red"; none that high: the
--                   best one), label_hint_frac is the smallest share among them
--   'image labels'  the most common data label among the labelled top picks, when it holds
--                   at least half of them (top_label, top_label_frac, top_label_n)
--   'icat logits'   the class the latent drives most: its largest positive ICAT edge into
--                   the logits (scope 'all'), by the atlas's first edge method of ig, srd,
--                   grad_x_act, grad
-- label_evidence spells out every piece ("texture=checker 100% colour=red 62% shape=circle
-- 31%", "label: tabby cat 12/16 top images", "drives: tabby cat (ig 3.2)").
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
attrs AS (
    SELECT sae_id, latent, attr, value, count(*) AS n
    FROM (SELECT sae_id, latent, unnest(['colour', 'texture', 'shape']) AS attr,
                 unnest([gt_colour, gt_texture, gt_shape]) AS value FROM top)
    WHERE value IS NOT NULL
    GROUP BY sae_id, latent, attr, value
    QUALIFY row_number() OVER (PARTITION BY sae_id, latent, attr ORDER BY n DESC, value) = 1
),
ranked_attrs AS (
    SELECT a.*, p.n_exemplars,
           row_number() OVER (PARTITION BY a.sae_id, a.latent ORDER BY a.n DESC, a.attr) AS r
    FROM attrs a JOIN per_latent p USING (sae_id, latent)
),
gt_hint AS (
    SELECT sae_id, latent,
           string_agg(attr || '=' || value, ' ' ORDER BY r)
               FILTER (WHERE 2 * n >= n_exemplars OR r = 1) AS hint,
           min(n) FILTER (WHERE 2 * n >= n_exemplars OR r = 1) / any_value(n_exemplars) AS frac,
           string_agg(attr || '=' || value || ' ' || round(100 * n / n_exemplars) || '%', ' '
                      ORDER BY r) AS evidence
    FROM ranked_attrs GROUP BY sae_id, latent
),
picks AS (
    SELECT p.sae_id, p.latent, p.image_id, p.source_group, i.label
    FROM ${exemplar_picks_or_empty} p LEFT JOIN ${images_or_empty} i USING (image_id)
    WHERE p.kind = 'top'
),
diversity AS (
    SELECT sae_id, latent, count(DISTINCT image_id) AS n_top_images,
           count(DISTINCT source_group) AS n_sources
    FROM picks GROUP BY sae_id, latent
),
labels AS (
    SELECT sae_id, latent, label, count(*) AS n,
           sum(count(*)) OVER (PARTITION BY sae_id, latent) AS n_labelled
    FROM picks WHERE label >= 0
    GROUP BY sae_id, latent, label
    QUALIFY row_number() OVER (PARTITION BY sae_id, latent ORDER BY n DESC, label) = 1
),
method AS (
    SELECT method FROM ${edges_or_empty}
    WHERE dst_layer = 'logits'
    ORDER BY CASE method WHEN 'ig' THEN 0 WHEN 'srd' THEN 1 WHEN 'grad_x_act' THEN 2 ELSE 3 END
    LIMIT 1
),
drives AS (
    SELECT m.sae_id, e.src_latent AS latent, e.dst_latent AS class, e.weight, e.method
    FROM ${edges_or_empty} e JOIN ${icat_saes} m ON m.layer = e.src_layer
    WHERE e.dst_layer = 'logits' AND e.scope = 'all' AND e.weight > 0
          AND e.method = (SELECT method FROM method)
    QUALIFY row_number() OVER (PARTITION BY m.sae_id, e.src_latent
                               ORDER BY e.weight DESC, e.dst_latent) = 1
),
named AS (
    SELECT s.sae_id, s.latent,
           coalesce(ln.name, 'label ' || l.label) AS top_label,
           l.n / l.n_labelled AS top_label_frac, l.n AS top_label_n, l.n_labelled,
           coalesce(cn.name, 'class ' || d.class) AS drives_class, d.weight AS drives_weight,
           d.method AS drives_method
    FROM latent_stats s
    LEFT JOIN labels l USING (sae_id, latent)
    LEFT JOIN ${label_names} ln ON ln.label = l.label
    LEFT JOIN drives d USING (sae_id, latent)
    LEFT JOIN ${class_names} cn ON cn.class = d.class
)
SELECT s.atlas_id, s.layer, s.sae_id, s.latent, s.freq, s.image_freq, s.mean_act, s.max_act,
       s.dead, s.n_pfvs, s.n_images,
       coalesce(v.n_top_images, 0) AS n_top_images, coalesce(v.n_sources, 0) AS n_sources,
       coalesce(p.n_exemplars, 0) AS n_exemplars,
       CASE WHEN g.hint IS NOT NULL THEN g.hint
            WHEN 2 * n.top_label_n >= n.n_labelled THEN n.top_label
            ELSE n.drives_class END AS label_hint,
       CASE WHEN g.hint IS NOT NULL THEN g.frac
            WHEN 2 * n.top_label_n >= n.n_labelled THEN n.top_label_frac END AS label_hint_frac,
       CASE WHEN g.hint IS NOT NULL THEN 'ground truth'
            WHEN 2 * n.top_label_n >= n.n_labelled THEN 'image labels'
            WHEN n.drives_class IS NOT NULL THEN 'icat logits' END AS label_source,
       nullif(concat_ws('; ', g.evidence,
                        'label: ' || n.top_label || ' ' || n.top_label_n || '/' || n.n_labelled
                            || ' labelled top images',
                        'drives: ' || n.drives_class || ' (' || n.drives_method || ' '
                            || round(n.drives_weight, 3) || ')'), '') AS label_evidence,
       n.top_label, n.top_label_frac, n.top_label_n, n.drives_class, n.drives_weight,
       p.cafe_ins_auc, p.cafe_del_auc, p.ins_auc_act, p.del_auc_act,
       p.ins_auc_random, p.del_auc_random,
       p.cafe_ins_auc > p.ins_auc_act AND p.cafe_del_auc < p.del_auc_act AS cafe_faithful,
       p.mask_frac, p.act_overlap, p.gt_iou_ierf, p.gt_iou_act
FROM latent_stats s
LEFT JOIN per_latent p USING (sae_id, latent)
LEFT JOIN gt_hint g USING (sae_id, latent)
LEFT JOIN diversity v USING (sae_id, latent)
LEFT JOIN named n USING (sae_id, latent);
