"""The read side of an atlas: DuckDB views, the `Atlas` API, FAISS indexes, contact sheets."""
from pipeline.atlas.api import Atlas, LatentInfo
from pipeline.atlas.views import QueryLimitError, ReadOnlyError

__all__ = ["Atlas", "LatentInfo", "QueryLimitError", "ReadOnlyError"]
