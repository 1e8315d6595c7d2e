"""`AtlasRoot`: what an atlas folder holds, answered in one place for every stage and reader.

An atlas root (a local folder or an fsspec URL) holds the extraction's recorded config
(`stages/extract.json`), the `layers` table, the committed SAEs (`saes` rows of the runs the
manifest lists), the manifest itself and the `errors` table. Stages get an `AtlasRoot`
instead of a path string, so each fact is read the same way everywhere (docs/architecture.md,
"The atlas root"). It is a small picklable value: Ray workers receive it and read what they
need themselves.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.store import fs
from pipeline.store.manifest import Manifest
from schemas import ERRORS

if TYPE_CHECKING:
    from pipeline.models import LoadedModel
    from pipeline.models.classes import ClassNames

EXTRACT_STAGE = "extract"
TRAIN_STAGE = "train-sae"


@dataclass(frozen=True)
class ExtractRecord:
    """How the PFVs under a root were extracted (`stages/extract.json`).

    `identity` is the whole recorded config (what the extract stage's outputs depend on);
    `config_hash` its hash, which later stages fold into their own.
    """

    model: str
    weights: str | None
    layers: tuple[str, ...]
    positions: int | None
    include_special: bool
    seed: int
    dtype: str
    weights_fingerprint: str
    atlas_id: str
    config_hash: str
    identity: dict[str, Any]


class AtlasRoot:
    """An atlas folder: a local path (kept absolute, since Ray workers run in other folders)
    or an fsspec URL."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        url = os.fspath(url)
        self.url = url if "://" in url else os.path.abspath(url)

    @classmethod
    def of(cls, root: AtlasRoot | str | os.PathLike[str]) -> AtlasRoot:
        """`root` itself when it is an AtlasRoot, else the AtlasRoot of that path or URL."""
        return root if isinstance(root, AtlasRoot) else cls(root)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"AtlasRoot({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtlasRoot) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def join(self, *parts: str) -> str:
        """The URL of `parts` under the root."""
        return fs.join(self.url, *parts)

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.url)

    # ---- the extraction ------------------------------------------------------------------

    def extract(self) -> ExtractRecord:
        """The recorded extraction config; FileNotFoundError when nothing was extracted."""
        url = self.join("stages", f"{EXTRACT_STAGE}.json")
        if not fs.exists(url):
            raise FileNotFoundError(f"no extraction under {self.url} (missing {url}); "
                                    "run extract first")
        stage = fs.read_json(url)
        ident = stage["config"]
        return ExtractRecord(
            model=ident["model"], weights=ident.get("weights"), layers=tuple(ident["layers"]),
            positions=ident.get("positions"), include_special=bool(ident["include_special"]),
            seed=ident["seed"], dtype=ident["dtype"],
            weights_fingerprint=ident["weights_fingerprint"], atlas_id=ident["atlas_id"],
            config_hash=stage["config_hash"], identity=ident)

    @property
    def atlas_id(self) -> str:
        return self.extract().atlas_id

    def layers(self) -> dict[str, dict[str, Any]]:
        """The `layers` table, {layer: row}; FileNotFoundError when nothing was extracted."""
        url = self.join("layers", "part-000000.parquet")
        if not fs.exists(url):
            raise FileNotFoundError(f"no extracted PFVs under {self.url} (missing {url}); "
                                    "run extract first")
        return {row["layer"]: row for row in fs.read_parquet(url).to_pylist()}

    def model(self, device: Any = "cpu") -> LoadedModel:
        """The extraction's model on `device`, checked to hold the weights the PFVs came from.

        Random initialisation (weights None) is seeded with 0, so every worker and every run
        holds the same model. Raises ValueError when the weights changed since extraction.
        """
        import torch

        from pipeline.models import load_model, model_fingerprint

        rec = self.extract()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loaded = load_model(rec.model, rec.weights, device=device)
        if model_fingerprint(loaded.model) != rec.weights_fingerprint:
            raise ValueError(f"the weights of {rec.model} ({loaded.weights}) changed since the "
                             f"PFVs under {self.url} were extracted; re-extract")
        return loaded

    def label_names(self) -> list[str] | None:
        """The names of the data's labels, when the shards' folder describes them
        (`dataset.json` beside the first shard, docs/data.md); None otherwise."""
        records = self.manifest.records(EXTRACT_STAGE)
        if not records:
            return None
        first = records[min(records)].input
        spec = fs.join(first.rsplit("/", 1)[0], "dataset.json") if "/" in first else "dataset.json"
        if not fs.exists(spec):
            return None
        names = fs.read_json(spec).get("class_names")
        return list(names) if names else None

    def class_names(self) -> ClassNames | None:
        """The names of the model's output classes: from the model's config or timm's ImageNet
        metadata (`pipeline.models.classes`), else the data's label names; None when neither
        is known."""
        from pipeline.models.classes import ClassNames, model_class_names

        try:
            names = model_class_names(self.extract().model)
        except FileNotFoundError:  # edges or tables without an extraction record (tests, copies)
            names = None
        if names is None and (labels := self.label_names()):
            names = ClassNames.from_names(labels)
        return names

    def labels_are_classes(self) -> bool:
        """Whether the shards' labels index the model's classes, so that an accuracy means
        something: true when the data names no labels (ImageNet shards with bare .cls), or when
        each label name is a name of the model's class with that index; false for data labelled
        with its own categories (a folder of photos: "animal", "food", ...)."""
        from pipeline.models.classes import model_class_names

        labels = self.label_names()
        if labels is None:
            return True
        # the model's own names, not class_names()'s fallback to the labels themselves (a model
        # without a class head would otherwise "name" every label)
        classes = model_class_names(self.extract().model)
        if classes is None or len(labels) > len(classes):
            return False
        return all(str(name).lower() in {s.lower() for s in classes.synonyms[i]}
                   for i, name in enumerate(labels))

    # ---- trained SAEs --------------------------------------------------------------------

    def saes(self) -> list[dict[str, Any]]:
        """Rows of the `saes` table of the committed SAE runs, by sae_id."""
        records = self.manifest.records(TRAIN_STAGE)
        rows: list[dict[str, Any]] = []
        for sae_id in sorted(records):
            rows.extend(fs.read_parquet(self.join("saes", f"part-{sae_id}.parquet")).to_pylist())
        return rows

    # ---- errors --------------------------------------------------------------------------

    def write_errors(self, stage: str, part: str, atlas_id: str, errors: list[Any]) -> None:
        """Write the `errors` part of (stage, part): one row per error record (a dataclass or
        a mapping with stage, shard, key, reason). Written even when empty: it marks the part
        read and replaces the errors of an earlier failed attempt."""
        rows = [dict(asdict(e) if is_dataclass(e) else e, atlas_id=atlas_id) for e in errors]
        table = pa.Table.from_pylist(rows, schema=ERRORS)
        fs.write_parquet(table, self.join("errors", f"stage={stage}", f"{part}.parquet"), ERRORS)
