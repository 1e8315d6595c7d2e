"""Saving and loading SAEs and training checkpoints, atomically and without pickle.

* A saved SAE is two files beside each other: `PATH.safetensors` (parameters and buffers:
  `scale`, the BatchTopK `threshold`, the dead-latent counters) and `PATH.json` (the config,
  the metrics and the scale as a readable number).
* A training checkpoint is a folder `ROOT/step-000001000/` holding that SAE pair plus
  `train_state.pt` (optimiser state, step, data position = batches consumed, torch RNG state),
  a plain-tensor dict readable with `torch.load(weights_only=True)`.

Every file is written under a temporary name and renamed into place, and a checkpoint folder
is assembled under a temporary name and renamed whole, so a crash never leaves a half-written
checkpoint that `latest_checkpoint` would pick up. A checkpoint that another program copies
file by file (Ray Train into its storage) is sealed first (`seal_checkpoint`: `files.json`,
each file's size), so that a copy cut short is told apart from a whole one (`is_sealed_copy`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from pipeline.sae.config import SAEConfig
from pipeline.sae.model import SAE

FORMAT = "concept-atlas-sae"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{9})$")


class TrainState(NamedTuple):
    """Where a resumed run continues: optimiser steps done, batches and PFVs consumed."""

    step: int
    position: int
    tokens: int


def save_sae(sae: SAE, path: str | os.PathLike[str], metrics: dict[str, Any] | None = None) -> None:
    """Write `path.safetensors` and `path.json` (`path` has no suffix)."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    tmp = base.with_name(base.name + ".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, base.with_name(base.name + ".safetensors"))
    threshold = float(sae.threshold)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": sae.cfg.to_dict(),
        "scale": float(sae.scale),
        "threshold": threshold if threshold >= 0 else None,
        "metrics": metrics or {},
    }
    text = json.dumps(info, indent=2, sort_keys=True)
    _write_text_atomic(base.with_name(base.name + ".json"), text)


def read_sae_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON side of a saved SAE: format, config, scale, threshold, metrics."""
    base = Path(path)
    info = json.loads(base.with_name(base.name + ".json").read_text())
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{base}.json is not a {FORMAT} v{FORMAT_VERSION} file "
            f"(format={info.get('format')!r}, version={info.get('format_version')!r})"
        )
    return info


def load_sae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE saved by `save_sae(sae, path)`, in eval mode, on `device`."""
    base = Path(path)
    info = read_sae_info(base)
    sae = SAE(SAEConfig.from_dict(info["config"]))
    sae.load_state_dict(load_file(str(base.with_name(base.name + ".safetensors"))), strict=True)
    return sae.to(device).eval()


def save_checkpoint(
    root: str | os.PathLike[str],
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep: int = 2,
) -> Path:
    """Write `root/step-{step:09d}/` atomically and keep only the newest `keep` checkpoints.

    Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:09d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_sae(sae, tmp / "sae")
    train_state = {
        "optimizer": optimizer.state_dict(),
        "step": state.step,
        "position": state.position,
        "tokens": state.tokens,
        "rng_cpu": torch.get_rng_state(),
        # the global RNG is saved so a batch factory drawing from it continues its stream
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(train_state, tmp / "train_state.pt")
    shutil.rmtree(final, ignore_errors=True)  # a re-run writing the same step replaces it
    os.rename(tmp, final)
    prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest `keep` checkpoint folders under `root` (keep <= 0: none)."""
    for old in _checkpoints(Path(root))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    found = _checkpoints(Path(root))
    return found[-1] if found else None


def load_checkpoint(
    checkpoint: str | os.PathLike[str], sae: SAE, optimizer: torch.optim.Optimizer
) -> TrainState:
    """Restore weights, buffers, optimiser state and RNG state in place; return the position.

    `sae` must be built from the same config (it is checked) and already on its device; the
    optimiser must be built over its parameters.
    """
    folder = Path(checkpoint)
    info = read_sae_info(folder / "sae")
    if info["config"] != sae.cfg.to_dict():
        raise ValueError(
            f"checkpoint {folder} was written with config {info['config']}, "
            f"not the current {sae.cfg.to_dict()}"
        )
    device = sae.W_dec.device
    sae.load_state_dict(load_file(str(folder / "sae.safetensors"), device=str(device)), strict=True)
    train_state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(train_state["optimizer"])
    torch.set_rng_state(train_state["rng_cpu"])
    if train_state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(train_state["rng_cuda"])
    return TrainState(
        step=int(train_state["step"]),
        position=int(train_state["position"]),
        tokens=int(train_state["tokens"]),
    )


SEAL = "files.json"


def seal_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Write `folder/files.json`: the size of every other file in the checkpoint folder."""
    folder = Path(folder)
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
             if p.is_file() and p.name != SEAL}
    _write_text_atomic(folder / SEAL, json.dumps(sizes))


def is_sealed_copy(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds a whole copy of a sealed checkpoint: its `files.json` reads and
    every file it lists is there with its size (a copy cut short misses one or the other)."""
    folder = Path(folder)
    try:
        sizes = json.loads((folder / SEAL).read_text())
        return bool(sizes) and all((folder / name).stat().st_size == size
                                   for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
