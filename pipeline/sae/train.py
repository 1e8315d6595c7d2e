"""Training SAEs: one framework-free step (DDP-ready) and a resumable single-process loop.

`train_step` is the unit a Ray Train `TorchTrainer` worker calls: it works on a bare `SAE` or
on a `DistributedDataParallel`-wrapped one (the unit-norm constraint and the running
statistics are applied to the unwrapped module; for a DDP module the statistics are
all-reduced over its process group so every worker holds the same dead-latent counters and
BatchTopK threshold). `train_sae` is the
single-process loop with checkpoints and a true resume.

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

import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pipeline.sae.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
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
    """Train one SAE for `steps` optimiser steps in this process.

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
    if steps < 1 or checkpoint_every < 1:
        raise ValueError(f"steps={steps} and checkpoint_every={checkpoint_every} must be >= 1")
    found = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if found is not None and not resume:
        # a fresh run would interleave its step folders with the old run's, and pruning
        # could then delete the new ones: refuse rather than mix two runs
        raise FileExistsError(f"{checkpoint_dir} already holds checkpoints ({found.name}); "
                              "pass resume=True to continue them or use an empty folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sae = SAE(cfg).to(device)
    optimizer = make_optimizer(sae, cfg)
    state = TrainState(step=0, position=0, tokens=0)
    if found is not None:
        state = load_checkpoint(found, sae, optimizer)
    stream = _open(batches, state.position)
    if found is None:
        first = next(stream, None)
        if first is None:
            raise ValueError("batches is empty: nothing to initialise or train the SAE on")
        stream = itertools.chain([first], stream)
        sae.initialize_from_sample((first if init_sample is None else init_sample).to(device))

    history: deque[dict[str, float]] = deque(maxlen=_SUMMARY_WINDOW)
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc="train SAE", unit="step")
    for step in range(state.step + 1, steps + 1):
        batch = next(stream, None)
        if batch is None:
            raise ValueError(
                f"batches ran out after {state.position} batches, before step {step} of {steps}"
            )
        history.append(train_step(sae, optimizer, batch.to(device)))
        state = TrainState(step, state.position + 1, state.tokens + batch.shape[0])
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", l0=f"{history[-1]['l0']:.1f}",
                        dead=f"{history[-1]['dead_frac']:.3f}", refresh=False)
        if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == steps):
            save_checkpoint(checkpoint_dir, sae, optimizer, state, keep=keep_checkpoints)
    bar.close()
    metrics: dict[str, Any] = (
        {key: sum(h[key] for h in history) / len(history) for key in _STEP_KEYS} if history else {}
    )
    # counters and θ are states, not per-step quantities: report their final values
    metrics.update(
        dead_frac=float(sae.dead_mask.float().mean()),
        threshold=float(sae.threshold),
        steps=steps,
        tokens=state.tokens,
    )
    return sae.eval(), metrics


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
