"""A read-only DuckDB connection whose views (schemas/views.sql) cover an atlas's Parquet parts.

User SQL runs against these views only (docs/architecture.md, "Principles": safe by
default). Two locks, both needed:
* every statement must be a SELECT (`check_read_only`, from DuckDB's own parser): COPY, ATTACH,
  INSTALL/LOAD, CREATE/INSERT, SET/PRAGMA/CALL, EXPLAIN ANALYZE of a write are refused before
  anything runs (the `query()` table function itself accepts only a SELECT);
* the connection may read files only under the atlas root (`enable_external_access = false`
  with `allowed_directories`), cannot load extensions, and its settings are locked
  (`lock_configuration`). DuckDB would still let a COPY write inside an allowed directory,
  which is why the statement check comes first.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.store import AtlasRoot, fs
from schemas import TABLES

STATEMENTS_ALLOWED = (duckdb.StatementType.SELECT,)


class ReadOnlyError(ValueError):
    """A statement that is not a plain query (the atlas is read-only)."""


class QueryLimitError(ValueError):
    """A query that ran past its time limit and was stopped."""


@dataclass(frozen=True)
class TableSource:
    """Where a view's rows come from: files `pattern` under the root, written by `stage`."""

    name: str
    pattern: str
    stage: str
    schema: pa.Schema
    fmt: str = "parquet"

    @property
    def folder(self) -> str:
        return self.pattern.split("/", 1)[0]


def _with(schema: pa.Schema, *fields: pa.Field) -> pa.Schema:
    return pa.schema([*schema, *fields])


# `**` also matches no folder, so a table may be flat (part-N.parquet) or partitioned
# (key=value/part-N.parquet) without a change here
SOURCES: dict[str, TableSource] = {s.name: s for s in (
    TableSource("images", "images/**/*.parquet", "extract", TABLES["images"]),
    TableSource("layers", "layers/**/*.parquet", "extract", TABLES["layers"]),
    TableSource("saes", "saes/**/*.parquet", "train-sae", TABLES["saes"]),
    TableSource("errors", "errors/**/*.parquet", "any stage", TABLES["errors"]),
    TableSource("manifest", "manifest/*/*.json", "any stage", pa.schema(
        [f.with_type(pa.float64()) if f.name in ("started", "finished") else f
         for f in TABLES["manifest"] if f.name != "atlas_id"]), fmt="json"),
    TableSource("pfv", "pfv/*/*.parquet", "extract",
                _with(TABLES["pfv_ids"], pa.field("layer", pa.string()),
                      pa.field("filename", pa.string()), pa.field("file_row_number", pa.int64()))),
    TableSource("activations", "activations/**/*.parquet", "scan", TABLES["activations"]),
    TableSource("latent_stats", "latent_stats/**/*.parquet", "scan", TABLES["latent_stats"]),
    TableSource("exemplar_picks", "exemplar_picks/**/*.parquet", "scan", TABLES["exemplar_picks"]),
    TableSource("exemplars", "exemplars/**/*.parquet", "cafe", TABLES["exemplars"]),
    TableSource("edges", "edges/**/*.parquet", "icat", TABLES["edges"]),
)}
VIEWS: tuple[str, ...] = (*SOURCES, "classes", "labels", "latents")
# the JSON record of a PartRecord (pipeline.store.manifest): times are epoch seconds
_MANIFEST_COLUMNS = (
    "{stage: 'VARCHAR', part: 'VARCHAR', input: 'VARCHAR', input_fingerprint: 'VARCHAR', "
    "config_hash: 'VARCHAR', rows: 'BIGINT', outputs: 'JSON', errors: 'BIGINT', "
    "worker: 'VARCHAR', started: 'DOUBLE', finished: 'DOUBLE'}")


def views_sql() -> str:
    """The text of schemas/views.sql (installed with the `schemas` package)."""
    return resources.files("schemas").joinpath("views.sql").read_text()


def table_files(root: str, name: str) -> list[str]:
    """The files of table `name` under atlas `root` (visible names only), sorted."""
    filesystem, path = fs.filesystem(root)
    found = filesystem.glob(fs.join(path, SOURCES[name].pattern))
    return sorted(p for p in found if not any(part.startswith((".", "_"))
                                              for part in p[len(path):].split("/")))


def connect(root: str, atlas_id: str, threads: int | None = None
            ) -> tuple[duckdb.DuckDBPyConnection, dict[str, int]]:
    """An in-memory DuckDB connection holding the views of atlas `root`, locked read-only.

    Returns the connection and {table: number of files} (0 for a table the atlas lacks). `root`
    is a local path or an fsspec URL (its filesystem is registered with DuckDB).
    """
    root = os.fspath(root).rstrip("/")
    con = duckdb.connect(":memory:")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    local = fs.local_path(root)
    if local is None:
        filesystem, path = fs.filesystem(root)
        con.register_filesystem(filesystem)
        # DuckDB may spell a globbed URL as the filesystem does (`memory:///x` for `memory://x`)
        prefixes = {root + "/", filesystem.unstrip_protocol(path).rstrip("/") + "/"}
    else:
        root = os.path.abspath(local)
        prefixes = {root + "/"}
    files = {name: len(table_files(root, name)) for name in SOURCES}
    con.execute(f"SET allowed_directories = [{', '.join(map(literal, sorted(prefixes)))}]")
    # DuckDB may always read its own temp folder (`.tmp/` in the working directory by default,
    # whatever another process left there): a private empty one per connection instead
    spill = tempfile.mkdtemp(prefix="atlas-duckdb-")
    weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)
    con.execute(f"SET temp_directory = {literal(spill)}")
    for setting in ("enable_external_access", "autoinstall_known_extensions",
                    "autoload_known_extensions", "allow_community_extensions",
                    "allow_persistent_secrets"):
        con.execute(f"SET {setting} = false")
    sources = {name: _source(con, root, s) if files[name] else _missing(con, root, s)
               for name, s in SOURCES.items()}
    for name in SOURCES:
        if name in TABLES:
            sources[f"{name}_or_empty"] = (name if files[name]
                                           else _typed_nulls(con, TABLES[name], "false"))
    sources.update(_names(root), atlas_id=literal(atlas_id))
    # safe_substitute leaves the placeholders named in the file's comments alone; a misspelt
    # one in a view stays `${...}` and fails DuckDB's parser loudly
    for statement in con.extract_statements(Template(views_sql()).safe_substitute(sources)):
        con.execute(statement.query)
    con.execute("SET lock_configuration = true")
    return con, files


def _names(root: str) -> dict[str, str]:
    """The VALUES relations of views.sql: the data's label names, the model's class names and
    the SAEs the icat stage connected (empty relations when the atlas does not know them)."""
    atlas = AtlasRoot(root)
    try:
        classes = atlas.class_names()
        labels = atlas.label_names()
    except (OSError, ValueError, KeyError):  # no extraction record or no model config to read
        classes = labels = None
    icat = fs.join(root, "stages", "icat.json")
    saes = fs.read_json(icat)["config"].get("saes", {}) if fs.exists(icat) else {}
    return {"label_names": _values([("label", "INTEGER"), ("name", "VARCHAR")],
                                   enumerate(labels or [])),
            "class_names": _values([("class", "INTEGER"), ("name", "VARCHAR")],
                                   enumerate(classes.names if classes else [])),
            "icat_saes": _values([("layer", "VARCHAR"), ("sae_id", "VARCHAR")],
                                 ((layer, v[0]) for layer, v in saes.items()))}


def _values(columns: list[tuple[str, str]], rows: Iterable[tuple[Any, ...]]) -> str:
    """A SQL relation of literal `rows` with `columns` [(name, DuckDB type)] (may be empty)."""
    typed = ", ".join(f"NULL::{t} AS \"{c}\"" for c, t in columns)
    body = [f"SELECT {typed} WHERE false"]
    rows = [", ".join(str(int(v)) if isinstance(v, int) else literal(str(v)) for v in row)
            for row in rows]
    if rows:
        names = ", ".join(f'"{c}"' for c, _ in columns)
        body.append(f"SELECT * FROM (VALUES {', '.join(f'({r})' for r in rows)}) AS t({names})")
    return "(" + " UNION ALL ".join(body) + ")"


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The one statement of `query` if it is a SELECT; ReadOnlyError naming it otherwise."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"cannot parse the query: {exc}") from None
    if len(statements) != 1:
        raise ReadOnlyError(f"expected one SELECT statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in STATEMENTS_ALLOWED:
        name = str(kind).rsplit(".", 1)[-1]
        raise ReadOnlyError(f"the atlas is read-only: {name} statements are refused; only SELECT "
                            f"queries (SELECT, WITH, FROM, DESCRIBE, SUMMARIZE) over the views "
                            f"{', '.join(VIEWS)} may run")
    return statements[0].query


def _source(con: duckdb.DuckDBPyConnection, root: str, s: TableSource) -> str:
    pattern = literal(fs.join(root, s.pattern))
    if s.fmt == "json":
        return f"read_json({pattern}, format = 'auto', columns = {_MANIFEST_COLUMNS})"
    # hive values stay strings (a layer named `4` must not become an integer); union_by_name
    # lets parts written by an older schema version sit beside newer ones
    source = (f"read_parquet({pattern}, hive_partitioning = true, hive_types_autocast = false, "
              f"union_by_name = true, filename = true, file_row_number = true)")
    # a column that no part has (an atlas built before the column existed) reads as NULL, so
    # an older atlas still opens; its rows just lack what the newer stage would add
    have = set(con.sql(f"SELECT * FROM {source} LIMIT 0").columns)
    absent = [f for f in s.schema if f.name not in have]
    if not absent:
        return source
    types = con.from_arrow(pa.schema(absent).empty_table()).types
    nulls = ", ".join(f'NULL::{t} AS "{f.name}"' for f, t in zip(absent, types))
    return f"(SELECT *, {nulls} FROM {source})"


def _missing(con: duckdb.DuckDBPyConnection, root: str, s: TableSource) -> str:
    message = (f"table {s.name} is not in this atlas (no files under {fs.join(root, s.folder)}/);"
               f" run stage {s.stage}" if s.stage != "any stage" else
               f"table {s.name} is not in this atlas (no files under {fs.join(root, s.folder)}/)")
    return _typed_nulls(con, s.schema, f"error({literal(message)}) IS NULL")


def _typed_nulls(con: duckdb.DuckDBPyConnection, schema: pa.Schema, where: str) -> str:
    """One row of NULLs with the columns and DuckDB types of `schema`, filtered by `where`."""
    types = con.from_arrow(schema.empty_table()).types
    columns = ", ".join(f'NULL::{t} AS "{f.name}"' for f, t in zip(schema, types))
    return f"(SELECT {columns} WHERE {where})"


def literal(text: str) -> str:
    """`text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"
