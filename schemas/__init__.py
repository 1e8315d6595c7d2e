"""The atlas data model: Arrow schemas of every table and the schema version."""
from schemas.tables import ERRORS, IMAGES, LAYERS, MANIFEST, PFV_IDS, SAES, SCHEMA_VERSION, TABLES

__all__ = ["ERRORS", "IMAGES", "LAYERS", "MANIFEST", "PFV_IDS", "SAES", "SCHEMA_VERSION", "TABLES"]
