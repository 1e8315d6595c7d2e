"""The authors' SRD maps on ResNet-50, made by their own code, as test fixtures.

    git clone https://github.com/Sangyu-Han/SharingRatioDecomposition /tmp/srd_ref/ref
    pip install --target /tmp/srd_ref/pkgs einops      # their code imports einops
    python benchmarks/srd_reference.py --reference /tmp/srd_ref/ref --extra-path /tmp/srd_ref/pkgs

The official code (MIT, github.com/Sangyu-Han/SharingRatioDecomposition) is run as an oracle from
that scratch checkout: it is read from there at run time, never copied into this project. The
model is ResNet-50 with weights drawn from `--seed` (`fixture_model`), run in float64 by both
codes; the images are scikit-image's bundled photos at `--size` px. Written to
tests/data/srd_reference_resnet50.npz (what tests/test_srd_reference.py compares with):
- `pixels` uint8 [N, H, W, 3], `names`, `seed`, `size`, and `logits` (the official model's logit
  of each target: the weights the test rebuilds from the seed must give them);
- `targets` [N] (each image's predicted class) and `maps` [N, H, W], the official saliency
  (`get_pixel_cont` without contrastive rule, one image at a time);
- `contrast_target` and `contrast_maps` [N, H, W]: one batch of all images, class
  `contrast_target`, with the official contrastive rule `x - x.mean()` (mean over the batch);
- `rel_<layer>` [N, h, w]: their recorded hidden-layer relevance (`simmaps`) of the plain run,
  under their layer names without the model-name prefix (`layer4.1` = that block's input);
- `erf_layer`, `erf_position` (row, col) and `erf` [N, H, W]: their `get_ERF` of one position;
- `tied_windows` [N]: (channel, window) pairs of the stem max-pool whose non-zero maximum is held
  by more than one tap (where the project's default and the reference differ on purpose).
Printed: per image, Pearson r and relative L2 of `srd.saliency` (default and reference=True).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline import srd  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "srd_reference_resnet50.npz"
IMAGES = ("coffee", "chelsea", "astronaut", "horse")  # two without tied stem windows, two with
LAYERS = ("layer4.1", "layer3.0", "layer2.1.relu2")  # their names: block inputs and a ReLU
ERF = ("layer3.1", (3, 4))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def fixture_model(seed: int) -> torch.nn.Module:
    """timm resnet50 in float64, eval mode, every parameter and BN statistic drawn from `seed`
    in module order (independent of timm's own init): convs N(0, 2/fan_in), BN affine and
    running statistics random (so BN shifts are non-zero and shared by norm), fc N(0, 1/fan_in)
    with a random bias."""
    gen = torch.Generator().manual_seed(seed)
    model = timm.create_model("resnet50", pretrained=False).double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen, dtype=torch.float64)
                                 * (2 / fan_in) ** 0.5)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
                mod.bias.copy_(0.3 * torch.randn(c, generator=gen, dtype=torch.float64))
                mod.running_mean.copy_(0.3 * torch.randn(c, generator=gen, dtype=torch.float64))
                mod.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
            elif isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen, dtype=torch.float64)
                                 / mod.weight.shape[1] ** 0.5)
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=gen, dtype=torch.float64))
    return model


def photos(names: tuple[str, ...], size: int) -> np.ndarray:
    """scikit-image's bundled photos, RGB, resized to size x size (bilinear): uint8 [N, H, W, 3]."""
    from PIL import Image
    from skimage import data

    out = []
    for name in names:
        a = getattr(data, name)()
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        out.append(np.asarray(Image.fromarray(a[..., :3]).resize((size, size), Image.BILINEAR)))
    return np.stack(out)


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float64 [N, 3, H, W] with the ImageNet mean and std."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255.0
    return (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)


def tied_windows(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per image, the (channel, window) pairs of the stem max-pool whose non-zero maximum is held
    by more than one tap: Tensor[N] long."""
    with torch.no_grad():
        act = model.act1(model.bn1(model.conv1(x)))
        pool = model.maxpool
        out = pool(act).flatten(2)
        cols = F.unfold(F.pad(act, [pool.padding] * 4, value=float("-inf")), pool.kernel_size, 1, 0, pool.stride)
        cols = cols.view(x.shape[0], act.shape[1], -1, out.shape[2])
        return (((cols == out.unsqueeze(2)).sum(2) > 1) & (out != 0)).flatten(1).sum(1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def official(reference: Path, model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Run the official code on `x` (the weights of `model` loaded into their ResNet-50)."""
    sys.path.insert(0, str(reference))
    torch.set_default_dtype(torch.float64)  # their code makes its buffers with the default dtype
    from modules.resnet import resnet50  # the scratch checkout's module, not the project's
    from util import InferencePkg

    net = resnet50(name="resnet50").eval()
    net.load_state_dict(model.state_dict())  # same module names; both BN eps 1e-5
    out: dict[str, list[np.ndarray]] = {"maps": [], "erf": [], "logits": [], "targets": []}
    out.update({f"rel_{name}": [] for name in LAYERS})
    with torch.no_grad():
        for i in range(x.shape[0]):
            started = time.time()
            pkg = InferencePkg()
            logits = net(x[i:i + 1], pkg)
            y = int(logits.argmax())
            out["targets"].append(np.int64(y))
            out["logits"].append(logits[0, y].numpy())
            out["maps"].append(net.get_pixel_cont(x[i:i + 1], y, pkg, lambda r: r)[0].numpy())
            for name in LAYERS:
                out[f"rel_{name}"].append(pkg.simmaps[f"resnet50.{name}"][0].numpy())
            seed = torch.zeros_like(pkg.simmaps[f"resnet50.{ERF[0]}"])
            seed[0, ERF[1][0], ERF[1][1]] = 1.0
            pkg = InferencePkg()
            net(x[i:i + 1], pkg)
            out["erf"].append(net.get_ERF(x[i:i + 1], seed, pkg, f"resnet50.{ERF[0]}")[0].numpy())
            print(f"  official maps of image {i}: {time.time() - started:.0f} s", flush=True)
        pkg = InferencePkg()
        net(x, pkg)
        target = out["targets"][0]
        contrast = net.get_pixel_cont(x, torch.tensor([target]), pkg, lambda r: r - r.mean())
    torch.set_default_dtype(torch.float32)
    res = {k: np.stack(v) for k, v in out.items()}
    res["contrast_target"] = np.int64(target)
    res["contrast_maps"] = contrast.numpy()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True,
                    help="a checkout of github.com/Sangyu-Han/SharingRatioDecomposition (outside this repo)")
    ap.add_argument("--extra-path", action="append", default=[],
                    help="a folder to import from first (where einops is installed)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--out", type=Path, default=FIXTURE)
    args = ap.parse_args()
    if Path(__file__).resolve().parents[1] in args.reference.resolve().parents:
        raise SystemExit(f"--reference {args.reference} lies inside this repository: use a scratch folder")
    sys.path[:0] = args.extra_path
    model = fixture_model(args.seed)
    pixels = photos(IMAGES, args.size)
    x = normalise(pixels)
    ref = official(args.reference, model, x)
    ties = tied_windows(model, x)
    ours = {flag: srd.saliency(model, x, torch.from_numpy(ref["targets"]), reference=flag)
            for flag in (False, True)}
    for i, name in enumerate(IMAGES):
        official_map = torch.from_numpy(ref["maps"][i])
        print(f"{name:10s} tied windows {int(ties[i]):5d}  " + "  ".join(
            f"{'reference' if flag else 'default'}: r {pearson(m[i], official_map):.6f} "
            f"rel L2 {rel_l2(m[i], official_map):.2e}" for flag, m in ours.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.astype(np.float32) if v.dtype == np.float64 and v.ndim > 1 else v for k, v in ref.items()}
    np.savez_compressed(args.out, pixels=pixels, names=np.array(IMAGES), seed=np.int64(args.seed),
                        size=np.int64(args.size), erf_layer=np.array(ERF[0]),
                        erf_position=np.array(ERF[1]), tied_windows=ties.numpy(), **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
