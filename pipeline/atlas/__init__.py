"""The read side of an atlas: DuckDB views, the `Atlas` API, FAISS indexes, contact sheets."""
from pipeline.atlas.api import Atlas, LatentInfo
from pipeline.atlas.views import ReadOnlyError

__all__ = ["Atlas", "LatentInfo", "ReadOnlyError"]
