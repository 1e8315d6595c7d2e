"""The stage registry: every stage of a build, in order. `build`, the command line and the
config checks all read `STAGES`; adding a stage is adding one entry (docs/architecture.md,
"Adding a stage").

A `Stage` names its options class (which gives its build-config section, its command-line
flags and its checks), how to run it on an atlas root, the section it needs before it in a
build config, and the checks that need more than its own options (a model to load, a sweep
against the extracted layers), which `build` runs for every stage before any of them works.
"""
from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.build import BuildConfig, CheckedBuild
    from pipeline.stage import Options


@dataclass(frozen=True)
class RunContext:
    """How a stage runs, whatever its options: the Ray cluster and whether to show progress."""

    address: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    name: its command (`concept-atlas NAME`) and its manifest stage; options_path:
    "module:Class" of its options (imported when needed, so the registry and `--help` stay
    light; `options.section` is its build-config section); run_path: "module:function" of
    `run(root, options, *, progress, address)` (no `address` unless `ray`), which returns the
    summary (a dict with `parts_failed` when it works part by part); needs: the section a
    build config must also have; check(config, checked): checks before any work in a build,
    which may record what they found on `checked`; ray: whether it may start Ray (its command
    takes --address); leading: options given as positional arguments before the root
    (`make-shards SRC OUT`); arguments / options_from_args: command-line flags beyond its
    options' fields and how they make its options; help and examples: for `--help`; root(config): where
    it writes in a build (default the output root).
    """

    name: str
    options_path: str
    run_path: str
    help: str
    examples: tuple[str, ...]
    needs: str | None = None
    check: Callable[[BuildConfig, CheckedBuild], None] | None = None
    ray: bool = True
    leading: tuple[str, ...] = ()
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    options_from_args: Callable[[argparse.Namespace], Options] | None = None
    root: Callable[[BuildConfig], str] = field(default=lambda cfg: cfg.out)

    @property
    def options(self) -> type[Options]:
        return _resolve(self.options_path)

    def run(self, root: str, options: Options, context: RunContext) -> Any:
        """Run the stage on `root` with `options`; its summary."""
        extra = {"address": context.address} if self.ray else {}
        return _resolve(self.run_path)(root, options, progress=context.progress, **extra)

    def wanted(self, cfg: BuildConfig) -> bool:
        """Whether the build config asks for this stage."""
        return self.name in cfg.options


def _resolve(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# ---- checks before any work ---------------------------------------------------------------


def _check_data(cfg: BuildConfig, checked: CheckedBuild) -> None:
    from jobs.make_data import synthetic_mismatch

    options = cfg.options["make-data"]
    checked.n_shards = math.ceil(options.n / options.shard_size)
    existing = synthetic_mismatch(cfg.data_dir, options)
    if existing:
        raise ValueError(f"{cfg.data_dir} holds another synthetic dataset ({existing}); "
                         f"delete it or use another output folder")


def _check_images(cfg: BuildConfig, checked: CheckedBuild) -> None:
    from pipeline.data.ingest import find_sources, plan_shards

    options = cfg.options["make-shards"]
    sources, _ = find_sources(options.src, options.path_column, options.label_column)
    checked.n_shards = len(plan_shards(sources, options))


def _check_extract(cfg: BuildConfig, checked: CheckedBuild) -> None:
    from pipeline.pfv.extract import STAGE, check_model, stage_identity
    from pipeline.store import check_stage_config

    options = cfg.options["extract"]
    if not {"make-data", "make-shards"} & set(cfg.options):
        from pipeline.data.shards import expand_shards

        checked.n_shards = len(expand_shards(list(options.shards or ())))
    checked.specs, _, weights_fp = check_model(options)
    check_stage_config(cfg.out, STAGE, stage_identity(options, weights_fp), write=False)


def _check_train(cfg: BuildConfig, checked: CheckedBuild) -> None:
    from pipeline.sae.stage import make_runs

    options = cfg.options["train-sae"]
    checked.runs = make_runs(options.sweep, {n: s.channels for n, s in checked.specs.items()},
                             options)
    if checked.n_shards < options.holdout_parts + options.workers:
        raise ValueError(
            f"{checked.n_shards} shards cannot hold out train_sae.holdout_parts="
            f"{options.holdout_parts} and feed train_sae.workers={options.workers} "
            f"(needs {options.holdout_parts + options.workers}); use more shards")


# ---- the command line of train-sae: a sweep from flags or a config -----------------------

SAE_FLAGS = ("n_latents", "variant", "k", "lr", "batch_size", "seed")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.sae.config import SAEConfig

    parser.add_argument("--config", help="a build YAML: train its train_sae sweep (and settings)")
    parser.add_argument("--layers", nargs="+", help="one SAE per layer, configured by the flags "
                        "below")
    sae = parser.add_argument_group("the SAE of each --layers entry (SAEConfig)")
    SAEConfig.add_arguments(sae, skip=[f for f in SAEConfig.field_names() if f not in SAE_FLAGS],
                            defaults={"n_latents": 1024})


def _train_options(args: argparse.Namespace) -> Options:
    from jobs.build import load_build_config
    from pipeline.sae.stage import TrainOptions

    given = {f: getattr(args, f) for f in TrainOptions.field_names()
             if hasattr(args, f) and getattr(args, f) is not None}
    if args.config:
        options = load_build_config(args.config).options.get("train-sae")
        if options is None:
            raise ValueError(f"{args.config} has no train_sae section")
        return options
    if not args.layers:
        raise ValueError("give --layers (one SAE per layer) or --config CONFIG.yaml")
    sae = {f: getattr(args, f) for f in SAE_FLAGS}
    return TrainOptions(**{k: v for k, v in given.items() if k != "sweep"},
                        sweep=tuple({"layer": layer, "sae": sae} for layer in args.layers))


STAGES: list[Stage] = [
    Stage("make-data", "pipeline.data.synthetic:SyntheticOptions", "jobs.make_data:run",
          "write the synthetic concept dataset (shapes x colours x textures x backgrounds, with "
          "ground-truth masks) as WebDataset shards",
          ("concept-atlas make-data data/synth --n 10000 --seed 0",
           "concept-atlas make-data data/shortcut --n 5000 --shortcut-prob 0.9"),
          check=_check_data, ray=False, root=lambda cfg: cfg.data_dir),
    Stage("make-shards", "pipeline.data.ingest:ShardsOptions", "jobs.make_data:shards",
          "your images as WebDataset shards: a folder (ImageFolder layout: labels from the "
          "sub-folder names), a glob, or a CSV / Parquet table of paths and labels",
          ("concept-atlas make-shards photos/ data/photos --crop 224",
           "concept-atlas make-shards 'pets/**/*.jpg' data/pets --crop 224 --crops 4",
           "concept-atlas make-shards labels.csv data/labelled --label-column label --crop 256"),
          check=_check_images, ray=False, leading=("src",), root=lambda cfg: cfg.data_dir),
    Stage("extract", "pipeline.pfv.extract:ExtractOptions", "jobs.extract:run",
          "extract PFVs of model layers from shards (Ray, resumable)",
          ("concept-atlas extract atlas/ --shards demo_out/data --model demo_resnet "
           "--layers layer2 layer4",
           "concept-atlas extract s3://b/atlas --shards 's3://b/imagenet/shard-{000000..001281}"
           ".tar' --model resnet50 --weights hub --layers layer3 --positions 16 --actors 8 "
           "--address auto"),
          check=_check_extract),
    Stage("train-sae", "pipeline.sae.stage:TrainOptions", "jobs.train_sae:run",
          "train SAEs on extracted PFVs (Ray Train, resumable)",
          ("concept-atlas train-sae atlas/ --layers layer2 layer4 --n-latents 512 --k 16",
           "concept-atlas train-sae demo_out --config configs/demo.yaml   # its sweep",
           "concept-atlas train-sae s3://b/atlas --config sweep.yaml --address auto"),
          needs="extract", check=_check_train, arguments=_train_arguments,
          options_from_args=_train_options),
    Stage("scan", "pipeline.latents.scan:ScanOptions", "jobs.scan:run",
          "the latent scan: SAE activations over every PFV, latent statistics, exemplar picks "
          "(Ray, resumable)",
          ("concept-atlas scan demo_out",
           "concept-atlas scan demo_out --in-process --n-top 8",
           "concept-atlas scan s3://b/atlas --address auto --gpus-per-task 0.25"),
          needs="train_sae"),
    Stage("cafe", "pipeline.cafe.stage:CafeOptions", "jobs.cafe:run",
          "CAFE: latent iERF masks and faithfulness for every exemplar pick (Ray, resumable)",
          ("concept-atlas cafe demo_out",
           "concept-atlas cafe atlas/ --faithfulness-per-latent 0 --in-process",
           "concept-atlas cafe s3://b/atlas --address auto --actors 8"),
          needs="scan"),
    Stage("index", "pipeline.atlas.index:IndexOptions", "pipeline.atlas.indexing:run",
          "build the FAISS indexes of an atlas (decoder directions, exemplar regions)",
          ("concept-atlas index demo_out",
           "concept-atlas index demo_out --exact-below 0   # IVF/PQ at any size"),
          needs="scan", ray=False),
    Stage("icat", "pipeline.icat.stage:ICATOptions", "jobs.icat:run",
          "ICAT edges between the tapped layers' latents and to the class logits (Ray, "
          "resumable)",
          ("concept-atlas icat demo_out --in-process --images-per-shard 4",
           "concept-atlas icat s3://b/atlas --methods ig grad_x_act --steps 16 --address auto"),
          needs="train_sae"),
]


def stage(name: str) -> Stage:
    """The stage called `name`; ValueError naming the stages otherwise."""
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; stages: {[s.name for s in STAGES]}")
