"""Training SAEs: one framework-free step (DDP-ready) and a resumable single-process loop.

`train_step` is the unit a Ray Train `TorchTrainer` worker calls: it works on a bare `SAE` or
on a `DistributedDataParallel`-wrapped one (the unit-norm constraint and the running
statistics are applied to the unwrapped module; for a DDP module the statistics are
all-reduced over its process group so every worker holds the same dead-latent counters and
BatchTopK threshold). `fit` is the one training
loop (`train_sae` runs it in this process; the train-sae stage in one process or in every Ray
Train worker), with checkpoints and a true resume.

Resume contract. A checkpoint records the number of batches consumed (`position`). On
resume, `batches` is re-opened at that position:
* a callable `batches(position) -> Iterable[Tensor[B, d_in]]` is called with it (preferred:
  the factory seeks, e.g. to a shard and row offset or by re-seeding its sampler);
* a plain iterable is iterated from its start again and the first `position` batches are
  skipped, which is only correct when iterating it twice yields the same sequence (a list, a
  deterministic dataset; not a one-shot generator).
With the same config, seed and data, a run interrupted after any checkpoint and resumed ends
with the same weights as an uninterrupted run.

Under Ray Train, each worker builds `SAE(cfg)`, calls `initialize_from_sample` on the same
sample (or loads a checkpoint), wraps it with `ray.train.torch.prepare_model`, builds
`make_optimizer` over the wrapped module and loops `train_step`; rank 0 writes
`save_checkpoint(root, unwrap(model), optimizer, TrainState(...))`.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pipeline.sae.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    seal_checkpoint,
)
from pipeline.sae.config import SAEConfig
from pipeline.sae.model import SAE

Batches = Iterable[Tensor] | Callable[[int], Iterable[Tensor]]
# metrics returned by train_sae are averaged over this many final steps
_SUMMARY_WINDOW = 100
_STEP_KEYS = ("loss", "mse", "l1", "aux", "l0", "dead_frac", "threshold")


def unwrap(sae: nn.Module) -> SAE:
    """The `SAE` inside a DDP (or any `.module`-style) wrapper, or `sae` itself."""
    core = getattr(sae, "module", sae)
    if not isinstance(core, SAE):
        raise TypeError(f"expected an SAE or a wrapper of one, got {type(core).__name__}")
    return core


def make_optimizer(sae: nn.Module, cfg: SAEConfig) -> torch.optim.Adam:
    """Adam with PyTorch's default betas (0.9, 0.999) and eps, no weight decay, lr = cfg.lr."""
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr)


def train_step(sae: nn.Module, optimizer: torch.optim.Optimizer, batch: Tensor) -> dict[str, float]:
    """One optimiser step on a batch of raw PFVs Tensor[B, d_in]; returns this step's stats.

    Order: forward and backward (DDP all-reduces gradients here), project the decoder
    gradient, optimiser step, renormalise decoder columns, update dead-latent counters and the
    BatchTopK threshold from worker-reduced statistics.

    Returns:
        loss, mse, l1, aux (unweighted AuxK), l0 (mean active latents per PFV on this worker),
        dead_frac (by the training counters) and threshold (BatchTopK θ, -1 if unset).
    """
    core = unwrap(sae)
    sae.train()
    optimizer.zero_grad(set_to_none=True)
    out = sae(batch)
    out.loss.backward()
    core.project_decoder_grad_()
    optimizer.step()
    core.normalize_decoder_()
    with torch.no_grad():
        active = out.acts > 0
        fired = active.any(dim=0)
        min_active = torch.where(active, out.acts, torch.full_like(out.acts, math.inf)).min()
        n_tokens = torch.tensor(batch.shape[0], device=fired.device)
        # only a DDP-wrapped SAE shares statistics: under Ray Train a process group exists
        # even when each worker trains its own SAE (a sweep), and those must not mix
        if isinstance(sae, DistributedDataParallel):
            fired, n_tokens, min_active = _all_reduce_stats(
                fired, n_tokens, min_active, sae.process_group
            )
        core.update_stats_(fired, n_tokens, min_active)
        stats = torch.stack([
            out.loss.detach().float(), out.mse.detach().float(), out.l1.detach().float(),
            out.aux.detach().float(), active.sum(dim=1).float().mean(),
            core.dead_mask.float().mean(), core.threshold.float(),
        ])
    return dict(zip(_STEP_KEYS, stats.tolist()))


# ---- sessions: where the loop runs and where its checkpoints go ---------------------------


class Session(Protocol):
    """What the training loop needs from its runtime (one process, or a Ray Train worker)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare(self, sae: SAE) -> nn.Module:
        """Wrap for data parallelism (DDP) when world_size > 1."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the newest persisted checkpoint, or None."""

    def persist(self, folder: str | None, metrics: dict[str, Any]) -> None:
        """Persist the checkpoint in `folder` (rank 0; None on other ranks), with `metrics`."""


class LocalSession:
    """One process; the newest checkpoint kept as `root/latest/` (replaced atomically)."""

    rank, world_size = 0, 1

    def __init__(self, root: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        self.root, self.device = Path(root), torch.device(device)

    def prepare(self, sae: SAE) -> nn.Module:
        return sae

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        latest = self.root / "latest"
        yield str(latest) if latest.is_dir() else None

    def persist(self, folder: str | None, metrics: dict[str, Any]) -> None:
        if folder is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".latest.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        shutil.rmtree(self.root / "latest", ignore_errors=True)
        os.rename(tmp, self.root / "latest")


class FolderSession(LocalSession):
    """One process; checkpoints kept as `root/step-NNNNNNNNN/`, the newest `keep` of them
    (`root` None: no checkpoints at all)."""

    def __init__(self, root: str | os.PathLike[str] | None, device: str | torch.device = "cpu",
                 keep: int = 2) -> None:
        super().__init__(root or ".", device)
        self.enabled, self.keep = root is not None, keep

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        found = latest_checkpoint(self.root) if self.enabled else None
        yield None if found is None else str(found)

    def persist(self, folder: str | None, metrics: dict[str, Any]) -> None:
        if folder is None or not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        name = Path(folder).name
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        os.rename(tmp, self.root / name)
        prune_checkpoints(self.root, self.keep)


# ---- the training loop --------------------------------------------------------------------


class InjectedFailure(RuntimeError):
    """Raised by `fit(crash_at_step=...)` to test recovery."""


@dataclass
class Fit:
    """A training run of `fit`, during (passed to `on_step`) and after (returned): the SAE (the
    core module, not a DDP wrapper), the per-step stats of the last steps, the current state,
    the state it started from, and `saved`, the metrics stored with the checkpoint it resumed
    from ({} for a fresh start)."""

    sae: SAE
    history: deque[dict[str, float]]
    state: TrainState
    start: TrainState
    saved: dict[str, float]
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def averages(self) -> dict[str, float]:
        """Per-step stats averaged over the last steps (empty when no step ran)."""
        h = self.history
        return {k: sum(x[k] for x in h) / len(h) for k in h[-1]} if h else {}

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def tokens_per_s(self) -> float:
        """PFVs per second trained by this run (not counting resumed ones)."""
        return (self.state.tokens - self.start.tokens) / max(self.seconds, 1e-9)


def fit(cfg: SAEConfig, batches: Batches, steps: int, session: Session, *,
        checkpoint_every: int, tag: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None, init_sample: Tensor | None = None,
        crash_at_step: int | None = None,
        on_step: Callable[[Fit], None] | None = None) -> Fit:
    """Train one SAE for `steps` optimiser steps, resuming from the session's checkpoint.

    The one training loop of the project: `train_sae` (one process) and the train-sae stage
    (`pipeline.sae.stage`, one process or every Ray Train worker in lockstep) both run it.

    Args:
        cfg: the SAE and its optimisation settings.
        batches: Tensor[B, d_in] batches of raw PFVs, or a factory `batches(position)`; see the
            module docstring for the resume contract.
        session: rank, device, DDP wrapping and where checkpoints persist.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        tag: stored with each checkpoint; a checkpoint is resumed only when its tag equals
            this one (None: any checkpoint of the session is resumed).
        report: extra values persisted with each checkpoint's metrics (e.g. the run's id).
        init_sample: Tensor[N, d_in] for the input scale and b_dec; default the first batch.
        crash_at_step: raise InjectedFailure at that step unless the run was resumed (tests).
        on_step: called after every step on rank 0 with the run so far (its `state.step`,
            `history`, `averages`, `tokens_per_s`).
    """
    if steps < 1 or checkpoint_every < 1:
        raise ValueError(f"steps={steps} and checkpoint_every={checkpoint_every} must be >= 1")
    device = session.device
    sae = SAE(cfg).to(device)
    optimizer = make_optimizer(sae, cfg)
    state, saved = _restore(session, sae, optimizer, tag)
    resumed = state is not None
    state = state or TrainState(step=0, position=0, tokens=0)
    stream = _open(batches, state.position)
    if not resumed:
        first = next(stream, None)
        if first is None:
            raise ValueError("batches is empty: nothing to initialise or train the SAE on")
        stream = itertools.chain([first], stream)
        sae.initialize_from_sample((first if init_sample is None else init_sample).to(device))
    model = session.prepare(sae)
    run = Fit(unwrap(model), deque(maxlen=_SUMMARY_WINDOW), state, state, saved)
    history = run.history
    for step in range(state.step + 1, steps + 1):
        if step == crash_at_step and not resumed:
            raise InjectedFailure(f"injected failure at step {step}")
        batch = next(stream, None)
        if batch is None:
            raise ValueError(
                f"batches ran out after {state.position} batches, before step {step} of {steps}")
        batch = batch.to(device, non_blocking=True)
        history.append(train_step(model, optimizer, batch))
        state = TrainState(step, state.position + 1,
                           state.tokens + batch.shape[0] * session.world_size)
        run.state = state
        if step % checkpoint_every == 0 or step == steps:
            _checkpoint(session, run.sae, optimizer, state, history, tag, report)
        if on_step is not None and session.rank == 0:
            on_step(run)
    run.finished = time.time()
    return run


def train_sae(
    cfg: SAEConfig,
    batches: Batches,
    steps: int,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    init_sample: Tensor | None = None,
    keep_checkpoints: int = 2,
) -> tuple[SAE, dict[str, Any]]:
    """Train one SAE for `steps` optimiser steps in this process (`fit` on a `FolderSession`).

    Args:
        cfg: the SAE and its optimisation settings (validated when it was built).
        batches: Tensor[B, d_in] batches of raw PFVs, or a factory `batches(position)`; see the
            module docstring for the resume contract.
        steps: total optimiser steps (a resumed run does only the remaining ones).
        checkpoint_dir: folder of `step-*/` checkpoints; None disables checkpointing.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        resume: continue from the newest checkpoint in `checkpoint_dir` when there is one.
        progress: show a tqdm bar (steps/s, ETA, loss, L0, dead fraction).
        device: where to train; default CUDA when available, else CPU.
        init_sample: Tensor[N, d_in] for the input scale and b_dec; default the first batch.
            Unused on resume (the checkpoint holds both).
        keep_checkpoints: newest checkpoints kept on disk.

    Returns:
        The trained SAE in eval mode, and metrics: loss, mse, l1, aux and l0 averaged over the
        last steps; the final dead_frac (training counters) and BatchTopK threshold; `steps`
        and `tokens` (PFVs trained on, this run and resumed ones).
    """
    found = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if found is not None and not resume:
        # a fresh run would interleave its step folders with the old run's, and pruning
        # could then delete the new ones: refuse rather than mix two runs
        raise FileExistsError(f"{checkpoint_dir} already holds checkpoints ({found.name}); "
                              "pass resume=True to continue them or use an empty folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    session = FolderSession(checkpoint_dir, device, keep_checkpoints)
    with session.latest_checkpoint() as folder:  # step-NNNNNNNNN: the step it resumes from
        initial = int(Path(folder).name.split("-")[1]) if folder else 0
    bar = tqdm(total=steps, initial=initial, disable=not progress, desc="train SAE", unit="step")

    def on_step(run: Fit) -> None:
        stats = run.history[-1]
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", l0=f"{stats['l0']:.1f}",
                        dead=f"{stats['dead_frac']:.3f}", refresh=False)

    done = fit(cfg, batches, steps, session, checkpoint_every=checkpoint_every,
               init_sample=init_sample, on_step=on_step)
    bar.close()
    averages = done.averages
    metrics: dict[str, Any] = {key: averages[key] for key in _STEP_KEYS} if averages else {}
    # counters and θ are states, not per-step quantities: report their final values
    metrics.update(dead_frac=float(done.sae.dead_mask.float().mean()),
                   threshold=float(done.sae.threshold), steps=steps, tokens=done.state.tokens)
    return done.sae.eval(), metrics


def _restore(session: Session, sae: SAE, optimizer: torch.optim.Optimizer,
             tag: dict[str, Any] | None) -> tuple[TrainState | None, dict[str, float]]:
    """Load the session's newest checkpoint into `sae` and `optimizer` when its tag matches."""
    with session.latest_checkpoint() as folder:
        if folder is None:
            return None, {}
        record = Path(folder) / "run.json"
        info = json.loads(record.read_text()) if record.is_file() else {"run": None,
                                                                         "metrics": {}}
        if tag is not None and info["run"] != tag:
            return None, {}  # the checkpoint of another (finished or changed) run
        return load_checkpoint(folder, sae, optimizer), info["metrics"]


def _checkpoint(session: Session, sae: SAE, optimizer: torch.optim.Optimizer,
                state: TrainState, history: deque[dict[str, float]],
                tag: dict[str, Any] | None, report: dict[str, Any] | None) -> None:
    metrics = {k: sum(h[k] for h in history) / len(history) for k in history[-1]}
    persisted = dict(metrics, **(report or {}), step=state.step)
    if session.rank != 0:
        session.persist(None, persisted)
        return
    with tempfile.TemporaryDirectory(prefix="sae-ckpt-") as tmp:
        folder = save_checkpoint(tmp, sae, optimizer, state, keep=1)
        (folder / "run.json").write_text(json.dumps({"run": tag, "metrics": metrics}))
        seal_checkpoint(folder)
        session.persist(str(folder), persisted)


def _open(batches: Batches, position: int) -> Iterator[Tensor]:
    """An iterator over `batches` starting after the first `position` batches."""
    if callable(batches):
        return iter(batches(position))
    return itertools.islice(iter(batches), position, None)


def _all_reduce_stats(
    fired: Tensor, n_tokens: Tensor, min_active: Tensor, group: dist.ProcessGroup
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum over workers in one collective: fired anywhere, total PFVs, mean per-worker θ sample.

    Each worker's BatchTopK keeps k·B_local activations, so its minimum kept activation is a
    per-batch threshold sample; their mean is what a single process would average over steps.
    """
    packed = torch.cat(
        [fired.double(), n_tokens.double().reshape(1), min_active.double().reshape(1)]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    world = dist.get_world_size(group)
    return packed[:-2] > 0, packed[-2].long(), packed[-1] / world
