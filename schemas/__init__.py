"""The atlas data model: Arrow schemas of every table and the schema version."""
from schemas.tables import (
    ACTIVATIONS,
    EDGES,
    ERRORS,
    EXEMPLAR_PICKS,
    EXEMPLARS,
    IMAGES,
    LATENT_STATS,
    LAYERS,
    MANIFEST,
    PFV_IDS,
    SAES,
    SCHEMA_VERSION,
    TABLES,
)

__all__ = ["ACTIVATIONS", "EDGES", "ERRORS", "EXEMPLAR_PICKS", "EXEMPLARS", "IMAGES",
           "LATENT_STATS", "LAYERS", "MANIFEST", "PFV_IDS", "SAES", "SCHEMA_VERSION", "TABLES"]
