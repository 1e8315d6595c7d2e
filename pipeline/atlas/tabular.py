"""Query results as files: the column conversions CSV needs (the `sql` command, the browser)."""
from __future__ import annotations

import json

import pyarrow as pa


def csv_ready(table: pa.Table) -> pa.Table:
    """`table` with every column CSV can hold as it is: lists, maps and structs become their
    JSON text, binary columns (PNG masks) their size ("<N bytes>")."""

    def text(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
        kind = column.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return pa.array([None if v is None else f"<{len(v)} bytes>"
                             for v in column.to_pylist()], pa.string())
        if pa.types.is_nested(kind):
            return pa.array([None if v is None else json.dumps(v, default=str)
                             for v in column.to_pylist()], pa.string())
        return column

    return pa.table([text(c) for c in table.columns], names=table.column_names)
