"""The train-sae stage: an SAE sweep on extracted PFVs, resumable, with held-out metrics and the
`saes` table.

Ray-free: each run is the one training loop (`pipeline.sae.train.fit`) talking to a `Session`
(rank, device, DDP wrapping, checkpoint persistence). `LocalSession` runs it in one process;
the Ray Train job (`jobs/train_sae.py`) passes a session over `ray.train` (checkpoints
reported to Ray Train's storage, restored by `ray.train.get_checkpoint()` after a worker
failure or on a re-run).

A run is one SAE config on one layer, named `sae_id = LAYER-NAME`. It is finished when the
manifest (stage `train-sae`, part `sae_id`) holds its record under the run's config hash;
the record is committed after the weights and the `saes` row are in place. Held-out data: the
last `holdout_parts` extracted parts of the layer never reach training; FVU, L0, dead and dense
fractions are measured on their PFVs, and logit fidelity on their images.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from pipeline.pfv.extract import decode_shard
from pipeline.pfv.parts import PFVPart, committed_parts, read_values
from pipeline.pfv.stream import DEFAULT_CACHE_BYTES, PFVStream, Reader
from pipeline.sae import SAE, SAEConfig, evaluate_sae, logit_fidelity, reconstruct_hook, save_sae
from pipeline.sae.train import Fit, Session, fit
from pipeline.stage import Options, option
from pipeline.store import AtlasRoot, PartRecord, config_hash, fs, now, worker_id
from schemas import SAES

STAGE = "train-sae"
_EVAL_BATCH = 8192


@dataclass(frozen=True)
class TrainOptions(Options):
    """An SAE sweep and the settings shared by its runs (docs/method.md §5).

    The outputs of a run depend on the run itself (its layer and SAEConfig), the extraction it
    trains on, `holdout_parts` and `window_parts` (see `run_hash`); the rest is how it runs.
    """

    section: ClassVar[str] = "train_sae"

    sweep: tuple[dict[str, Any], ...] = option(
        (), "the runs: {layer, sae: {SAEConfig fields but d_in}, name?, steps?}", cli=False)
    steps: int = option(2000, "optimiser steps per run (a run may override it)", min=1)
    checkpoint_every: int = option(250, "steps between checkpoints", min=1)
    holdout_parts: int = option(1, "last extracted parts kept for held-out metrics", min=1,
                                expect="an int >= 1 (fidelity and FVU are measured on "
                                "held-out images)")
    window_parts: int = option(8, "extracted parts shuffled together", min=1)
    fidelity_images: int = option(512, "held-out images for logit fidelity", min=1)
    eval_pfvs: int = option(200_000, "held-out PFVs for FVU, L0, dead and dense fractions",
                            min=1)
    max_sae_gib: float = option(16.0, "refuse SAEs whose weights, gradients and Adam state "
                                "exceed this", gt=0)
    workers: int = option(1, "DDP workers (Ray Train)", runtime=True, min=1)
    cpus_per_worker: float = option(1.0, "Ray CPUs per worker (and its torch threads)",
                                    runtime=True, gt=0)
    use_gpu: bool | None = option(None, "train on GPUs (default: when the cluster has them)",
                                  runtime=True)
    cache_bytes: int = option(DEFAULT_CACHE_BYTES, "per-worker in-memory PFV cache",
                              runtime=True, min=0)
    max_failures: int = option(3, "worker-group restarts Ray Train allows (each resumes from "
                               "a checkpoint)", runtime=True, min=0)
    in_process: bool = option(False, "train in this process, without Ray (debugging, small "
                              "jobs; the same weights)", runtime=True)


@dataclass(frozen=True)
class SAERun:
    """One SAE of the sweep: `cfg` (d_in = the layer's channels) trained `steps` steps."""

    sae_id: str
    layer: str
    cfg: SAEConfig
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {"sae_id": self.sae_id, "layer": self.layer, "cfg": self.cfg.to_dict(),
                "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAERun:
        return cls(d["sae_id"], d["layer"], SAEConfig.from_dict(d["cfg"]), d["steps"])


def make_runs(sweep: Sequence[dict[str, Any]], channels: dict[str, int],
              options: TrainOptions) -> list[SAERun]:
    """Validate the sweep entries `{layer, sae: {SAEConfig fields but d_in}, name?, steps?}`.

    `channels` maps each extracted (or to-be-extracted) layer to its PFV width. Raises
    ValueError naming the entry and the problem: an unknown layer, a bad SAEConfig field
    (e.g. k > n_latents), an SAE too big for `max_sae_gib`, duplicate names.
    """
    if not sweep:
        raise ValueError("train_sae.sweep is empty: list at least one {layer, sae} entry")
    runs: list[SAERun] = []
    for i, entry in enumerate(sweep):
        where = f"train_sae.sweep[{i}]"
        unknown = sorted(set(entry) - {"layer", "sae", "name", "steps"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: layer, sae, name, steps")
        layer = entry.get("layer")
        if layer not in channels:
            raise ValueError(f"{where}: layer {layer!r} is not extracted; "
                             f"extracted layers: {', '.join(channels) or 'none'}")
        fields = dict(entry.get("sae") or {})
        if "d_in" in fields:
            raise ValueError(f"{where}: d_in is the layer's width ({channels[layer]}); remove it")
        try:
            cfg = SAEConfig.from_dict(dict(fields, d_in=channels[layer]))
        except ValueError as exc:
            raise ValueError(f"{where} (layer {layer}): {exc}") from None
        _check_fits(cfg, options, where)
        steps = entry.get("steps", options.steps)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}: steps={steps!r}: expected an int >= 1")
        k = f"-k{cfg.k}" if cfg.variant != "relu" else ""
        name = entry.get("name") or f"{cfg.variant}-{cfg.n_latents}{k}"
        runs.append(SAERun(f"{layer}-{name}", layer, cfg, steps))
    ids = [r.sae_id for r in runs]
    dupes = sorted({s for s in ids if ids.count(s) > 1})
    if dupes:
        raise ValueError(f"train_sae.sweep names runs twice: {dupes}; give each a distinct `name`")
    return runs


def _check_fits(cfg: SAEConfig, options: TrainOptions, where: str) -> None:
    # weights + gradients + Adam's two moments, in the parameter dtype
    need = 4 * 2 * cfg.n_latents * cfg.d_in * torch.empty((), dtype=cfg.torch_dtype).element_size()
    if need > options.max_sae_gib * 2**30:
        raise ValueError(
            f"{where}: n_latents={cfg.n_latents} x d_in={cfg.d_in} needs ~{need / 2**30:.1f} GiB "
            f"for weights, gradients and Adam state, more than max_sae_gib={options.max_sae_gib}")


def split_holdout(parts: list[PFVPart], holdout_parts: int) -> tuple[list[PFVPart], list[PFVPart]]:
    """(training parts, held-out parts): the last `holdout_parts` parts are held out."""
    if len(parts) <= holdout_parts:
        raise ValueError(f"{len(parts)} extracted parts cannot hold out {holdout_parts} and still "
                         "train: extract more shards or lower train_sae.holdout_parts")
    return parts[:-holdout_parts], parts[-holdout_parts:]


def run_hash(run: SAERun, options: TrainOptions, extract_hash: str) -> str:
    """What makes a finished run reusable: the run, the data it saw, the shuffling window."""
    return config_hash({"run": run.to_dict(), "extract": extract_hash,
                        "holdout_parts": options.holdout_parts,
                        "window_parts": options.window_parts})


# ---- training ---------------------------------------------------------------------------


def train_run(run: SAERun, parts: list[PFVPart], options: TrainOptions, session: Session,
              reader: Reader | None = None, crash_at_step: int | None = None,
              log: bool = True) -> tuple[SAE, dict[str, Any]]:
    """Train `run` on `parts`, resuming from the session's checkpoint of this run if any.

    Every rank calls this in lockstep. Checkpoints (every `checkpoint_every` steps and at the
    end) hold weights, optimiser state, step and data position; a resumed run continues the
    same batch sequence (`PFVStream`) and ends with the weights of an uninterrupted one.
    `crash_at_step` raises InjectedFailure at that step unless the run was resumed (tests);
    `log`: a progress line every tenth of the run's steps.

    Returns the trained SAE (eval mode) and training metrics averaged over the last steps.
    """
    stream = PFVStream(parts, run.cfg.batch_size, run.cfg.seed, session.rank,
                       session.world_size, options.window_parts, reader, options.cache_bytes)
    log_every = max(1, run.steps // 10)

    def show(progress: Fit) -> None:
        step = progress.state.step
        if step == progress.start.step + 1 and progress.start.step:
            print(f"[train-sae] {run.sae_id} resumed from its checkpoint at step "
                  f"{progress.start.step}/{run.steps}", flush=True)
        if step % log_every == 0 or step == run.steps:
            metrics = progress.averages
            print(f"[train-sae] {run.sae_id} step {step}/{run.steps} loss {metrics['loss']:.4f} "
                  f"l0 {metrics['l0']:.1f} dead {metrics['dead_frac']:.3f} "
                  f"{progress.tokens_per_s:,.0f} PFV/s", flush=True)

    done = fit(run.cfg, stream, run.steps, session, checkpoint_every=options.checkpoint_every,
               tag=run.to_dict(), report={"sae_id": run.sae_id}, crash_at_step=crash_at_step,
               on_step=show if log else None)
    # a run resumed from its last checkpoint trains no step: keep the metrics saved with it
    metrics = dict(done.averages or done.saved, steps=run.steps, tokens=done.state.tokens,
                   dead_frac_train=float(done.sae.dead_mask.float().mean()),
                   train_seconds=round(done.seconds, 2),
                   tokens_per_s=round(done.tokens_per_s, 1))
    return done.sae.eval(), metrics


# ---- evaluation and outputs (rank 0) ------------------------------------------------------


class Evaluator:
    """Held-out metrics of SAEs: FVU/L0/dead/dense on PFVs, logit fidelity on images.

    Loads the extraction's model once (lazily) and checks that its weights are the ones the
    PFVs were extracted with.
    """

    def __init__(self, root: AtlasRoot, options: TrainOptions, device: torch.device) -> None:
        self.root, self.options, self.device = root, options, device
        self.extract = root.extract()
        self.layers = root.layers()
        self._model: nn.Module | None = None
        self._images: dict[tuple[str, ...], tuple[Tensor, np.ndarray]] = {}

    def model(self) -> nn.Module:
        if self._model is None:
            loaded = self.root.model(self.device)
            self._model, self._data_config = loaded.model, loaded.data_config
        return self._model

    def images(self, held: list[PFVPart]) -> tuple[Tensor, np.ndarray]:
        """Preprocessed held-out images Tensor[N, 3, H, W] and labels int[N] (-1 unknown)."""
        key = tuple(p.part for p in held)
        if key not in self._images:
            self.model()
            records = self.root.manifest.records("extract")
            pixels, labels, n = [], [], 0
            for p in held:
                if n >= self.options.fidelity_images:
                    break
                decoded = decode_shard(records[p.part].input, self._data_config)
                take = self.options.fidelity_images - n
                pixels.append(decoded.pixels[:take])
                labels.append(decoded.labels[:take])
                n += len(pixels[-1])
            self._images[key] = (torch.from_numpy(np.concatenate(pixels)),
                                 np.concatenate(labels))
        return self._images[key]

    @torch.no_grad()
    def evaluate(self, sae: SAE, layer: str, held: list[PFVPart]) -> dict[str, Any]:
        values = read_values(held, self.options.eval_pfvs)
        batches = (torch.from_numpy(values[i:i + _EVAL_BATCH])
                   for i in range(0, len(values), _EVAL_BATCH))
        metrics: dict[str, Any] = evaluate_sae(sae.to(self.device), batches)
        model = self.model()
        pixels, labels = self.images(held)
        module = dict(model.named_modules())[layer]
        keep = 0 if self.extract.include_special else int(self.layers[layer]["num_special"])
        orig, recon = [], []
        for i in range(0, len(pixels), 64):
            x = pixels[i:i + 64].to(self.device)
            orig.append(model(x).float().cpu())
            handle = module.register_forward_hook(reconstruct_hook(sae, keep))
            try:
                recon.append(model(x).float().cpu())
            finally:
                handle.remove()
        logits, logits_r = torch.cat(orig), torch.cat(recon)
        fid = logit_fidelity(logits, logits_r)
        known = labels >= 0  # over the labelled images only
        accuracy = (float((logits.argmax(1).numpy()[known] == labels[known]).mean())
                    if known.any() and self.root.labels_are_classes() else None)
        # a model without a class head outputs features: an argmax or softmax of them means nothing
        headless = getattr(model, "num_classes", None) == 0
        metrics.update(logit_agreement=None if headless else fid["top1_agreement"],
                       logit_kl=None if headless else fid["kl"],
                       model_accuracy=accuracy, heldout_images=int(len(pixels)),
                       heldout_pfvs=int(metrics.pop("n_tokens")))
        return metrics


def save_run(root: AtlasRoot, run: SAERun, sae: SAE, train_metrics: dict[str, Any],
             eval_metrics: dict[str, Any], atlas_id: str, digest: str, started: float,
             input_fingerprint: str) -> PartRecord:
    """Write the SAE (safetensors + json), its `saes` row, then commit its manifest record."""
    weights = root.join("sae_weights", run.sae_id)
    metrics = {"train": train_metrics, "heldout": eval_metrics}
    with tempfile.TemporaryDirectory(prefix="sae-") as tmp:
        save_sae(sae, Path(tmp) / "sae", metrics)
        for suffix in (".safetensors", ".json"):
            data = (Path(tmp) / f"sae{suffix}").read_bytes()
            fs.write_atomic(weights + suffix, lambda f, d=data: f.write(d))
    cfg = run.cfg
    row = {
        "atlas_id": atlas_id, "layer": run.layer, "sae_id": run.sae_id, "variant": cfg.variant,
        "d_in": cfg.d_in, "n_latents": cfg.n_latents,
        "k": cfg.k if cfg.variant != "relu" else 0, "steps": run.steps,
        "tokens": train_metrics["tokens"], "fvu": eval_metrics["fvu"], "l0": eval_metrics["l0"],
        "dead_frac": eval_metrics["dead_frac"], "dense_frac": eval_metrics["dense_frac"],
        "logit_agreement": eval_metrics["logit_agreement"], "logit_kl": eval_metrics["logit_kl"],
        "model_accuracy": eval_metrics["model_accuracy"],
        "heldout_images": eval_metrics["heldout_images"],
        "heldout_pfvs": eval_metrics["heldout_pfvs"], "weights": weights,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    fs.write_parquet(pa.Table.from_pylist([row], schema=SAES),
                     root.join("saes", f"part-{run.sae_id}.parquet"), SAES)
    record = PartRecord(stage=STAGE, part=run.sae_id, input=run.layer,
                        input_fingerprint=input_fingerprint, config_hash=digest, rows=1,
                        outputs={"saes": 1, f"sae_weights/{run.sae_id}": 1}, errors=0,
                        worker=worker_id(), started=started, finished=now())
    root.manifest.commit(record)
    return record


def parts_fingerprint(parts: list[PFVPart]) -> str:
    """Identifies the PFV parts a run trained and was evaluated on."""
    return config_hash({"parts": [(p.part, p.rows) for p in parts]})


def train_runs(root: AtlasRoot | str, runs: Sequence[SAERun], options: TrainOptions,
               session: Session, reader: Reader | None = None,
               crash_at: tuple[str, int] | None = None, log: bool = True) -> list[str]:
    """Train, evaluate and save every unfinished run of the sweep; returns the sae_ids trained.

    Every rank calls this; rank 0 evaluates and writes. A finished run (committed record with
    its current config hash) is skipped, so a re-run after a crash continues where it stopped.
    `crash_at` = (sae_id, step) makes that run fail once at that step (tests of recovery).
    """
    root = AtlasRoot.of(root)
    extract = root.extract()
    extract_hash, atlas_id = extract.config_hash, extract.atlas_id
    evaluator = Evaluator(root, options, session.device) if session.rank == 0 else None
    trained = []
    for run in runs:
        digest = run_hash(run, options, extract_hash)
        done = root.manifest.done(STAGE, digest)
        if run.sae_id in done:
            continue
        started = now()
        train_parts, held = split_holdout(committed_parts(root.url, run.layer),
                                          options.holdout_parts)
        crash = crash_at[1] if crash_at and crash_at[0] == run.sae_id else None
        sae, train_metrics = train_run(run, train_parts, options, session, reader, crash, log)
        if evaluator is not None:
            eval_metrics = evaluator.evaluate(sae, run.layer, held)
            save_run(root, run, sae, train_metrics, eval_metrics, atlas_id, digest, started,
                     parts_fingerprint(train_parts + held))
            print(f"[train-sae] {run.sae_id}: FVU {eval_metrics['fvu']:.4f} "
                  f"L0 {eval_metrics['l0']:.1f} dead {eval_metrics['dead_frac']:.3f} "
                  f"dense {eval_metrics['dense_frac']:.3f}"
                  + ("" if eval_metrics["logit_agreement"] is None else
                     f" top-1 agreement {eval_metrics['logit_agreement']:.3f} "
                     f"KL {eval_metrics['logit_kl']:.4f}"), flush=True)
        trained.append(run.sae_id)
    return trained


def plan_runs(root: AtlasRoot | str, options: TrainOptions) -> tuple[list[SAERun], list[SAERun]]:
    """Validate the sweep against the extraction under `root`: (all runs, unfinished runs).

    Raises before any work for an unknown layer, a bad or oversized SAE config, or too few
    extracted parts to hold some out and feed every worker.
    """
    root = AtlasRoot.of(root)
    extract_hash = root.extract().config_hash
    channels = {name: row["channels"] for name, row in root.layers().items()}
    runs = make_runs(options.sweep, channels, options)
    for layer in sorted({r.layer for r in runs}):
        train, held = split_holdout(committed_parts(root, layer), options.holdout_parts)
        if not sum(p.rows for p in held):
            raise ValueError(
                f"layer {layer}: the held-out parts {', '.join(p.part for p in held)} hold no "
                "PFVs (their shards were unreadable: the errors table of stage extract says "
                "why); replace those shards and re-run extract, or hold out other parts")
        if len(train) < options.workers:
            raise ValueError(f"layer {layer}: {len(train)} training parts for "
                             f"{options.workers} workers; use at most {len(train)} workers")
    manifest = root.manifest
    pending = [r for r in runs
               if r.sae_id not in manifest.done(STAGE, run_hash(r, options, extract_hash))]
    return runs, pending


def print_summary(rows: list[dict[str, Any]], seconds: float, model: str) -> None:
    print(f"[train-sae] {len(rows)} SAEs in {seconds:.1f}s (held-out metrics)")
    print(f"{'sae_id':<28} {'latents':>7} {'k':>3} {'FVU':>7} {'L0':>6} {'dead%':>6} "
          f"{'dense%':>6} {'top1agr':>7} {'KL':>7}")
    for r in rows:
        print(f"{r['sae_id']:<28} {r['n_latents']:>7} {r['k']:>3} {r['fvu']:>7.4f} "
              f"{r['l0']:>6.1f} {100 * r['dead_frac']:>6.2f} {100 * r['dense_frac']:>6.2f} "
              + (f"{'-':>7} {'-':>7}" if r["logit_agreement"] is None else
                 f"{r['logit_agreement']:>7.3f} {r['logit_kl']:>7.4f}"))
    accuracy = [r["model_accuracy"] for r in rows if r["model_accuracy"] is not None]
    if accuracy:
        # the shards' labels name the model's classes (AtlasRoot.labels_are_classes)
        print(f"[accuracy] {model}: {accuracy[0]:.2%} top-1 on the labelled of "
              f"{rows[0]['heldout_images']} held-out images")
