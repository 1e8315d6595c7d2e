"""Benchmark the SRD engine against a plain input gradient and Captum IntegratedGradients.

    python benchmarks/srd.py                        # resnet50 + vit_base_patch16_224, 224 px, batch 8
    python benchmarks/srd.py --batch 2 --ig-batch 2 # what fits a small CPU
    python benchmarks/srd.py --out results.json --models resnet50

All timings of one model are taken in one run on one device (ratios are meaningful only within a
run): SRD saliency vs forward + backward of the input gradient (target <= 4) and vs Captum IG
with 50 steps on the same batch (target <= 0.2). Peak memory of each method: on CUDA
`torch.cuda.max_memory_allocated` above the allocation before the call; on CPU the growth of
the resident set (sampled from /proc/self/statm every 2 ms) above its level before the call, in
a fresh process per method (tracemalloc cannot see torch's C++ allocator, and a process that
already ran another method keeps freed pages); IG's peak is taken with 2 chunks of
internal_batch_size rows, as its peak does not grow with the number of steps. "reference-style" is the per-image cost of the
authors' code path for the same model: 2 k^2 full convolutions per conv layer at batch 1
(k^2 k_p^2 per pooled composite), timed with the real layer shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline import srd  # noqa: E402
from pipeline.models import checked_device  # noqa: E402

METHODS = ("grad", "srd", "ig")


def make(model_name: str, batch: int, size: int, device: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = {"img_size": size} if "vit" in model_name else {}
    model = timm.create_model(model_name, pretrained=False, **kwargs).eval().to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        target = model(images).argmax(1)
    return model, images, target


def method(name: str, model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor,
           ig_steps: int, ig_batch: int) -> Callable[[], object]:
    if name == "grad":
        def grad() -> torch.Tensor:
            x = images.clone().requires_grad_(True)
            model(x).gather(1, target[:, None]).sum().backward()
            return x.grad
        return grad
    if name == "srd":
        return lambda: srd.saliency(model, images, target)
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    return lambda: ig.attribute(images, target=target, n_steps=ig_steps, internal_batch_size=ig_batch)


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: str,
          warmup: bool = True) -> dict[str, float]:
    """Best wall time of each function over `repeats` rounds (after a warm-up round). The rounds
    interleave the functions, so that a shared machine's changing load hits them alike."""
    for fn in fns.values() if warmup else ():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Bytes above the level before the call (CUDA allocator, or sampled CPU resident set)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(peak[0], _rss()) - base


def reference_style(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """The reference's SRD cost for one image: 2 k^2 full convolutions per conv layer at batch 1
    (2 k^2 k_p^2 for a conv after the stem max-pool), with the model's real layer shapes."""
    convs: list[tuple[torch.nn.Conv2d, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: convs.append((m, a[0])))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(images[:1])
    for h in hooks:
        h.remove()
    pooled = {id(m) for m in _convs_after_maxpool(model)}

    def run() -> None:
        with torch.no_grad():
            for conv, x in convs:
                k = conv.weight.shape[2] * conv.weight.shape[3] * (9 if id(conv) in pooled else 1)
                for _ in range(2 * k):
                    F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return run


def _convs_after_maxpool(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    layer1 = getattr(model, "layer1", None)
    if layer1 is None or not isinstance(getattr(model, "maxpool", None), torch.nn.MaxPool2d):
        return []
    first = layer1[0]
    out = [first.conv1]
    if first.downsample is not None:
        out += [m for m in first.downsample.modules() if isinstance(m, torch.nn.Conv2d)]
    return out


def worker(args: argparse.Namespace) -> None:
    """Measure one method's peak memory in this fresh process; print bytes as JSON."""
    model, images, target = make(args.worker_model, args.batch, args.size, args.device)
    # IG's peak does not depend on the step count (captum runs internal_batch_size rows at a time)
    steps = min(args.ig_steps, 2 * max(1, args.ig_batch // args.batch))
    fn = method(args.worker_method, model, images, target, steps, args.ig_batch)
    print(json.dumps({"peak_bytes": peak_memory(fn, args.device)}))


def memory_in_subprocess(args: argparse.Namespace, model_name: str, name: str) -> int:
    cmd = [sys.executable, __file__, "--worker-model", model_name, "--worker-method", name,
           "--batch", str(args.batch), "--size", str(args.size), "--device", args.device,
           "--ig-steps", str(args.ig_steps), "--ig-batch", str(args.ig_batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds of grad and SRD (best)")
    p.add_argument("--ig-steps", type=int, default=50)
    p.add_argument("--ig-batch", type=int, default=None,
                   help="rows per IG forward/backward (captum internal_batch_size; default: --batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/srd_<device>.json)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-method", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        checked_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    args.ig_batch = args.ig_batch or args.batch
    if args.worker_model:
        return worker(args)
    out = args.out or Path(__file__).parent / "results" / f"srd_{args.device}.json"
    rows = []
    for name in args.models:
        model, images, target = make(name, args.batch, args.size, args.device)
        fns = {m: method(m, model, images, target, args.ig_steps, args.ig_batch) for m in ("grad", "srd")}
        if "vit" not in name:  # the reference code covers CNNs only
            fns["reference_style_1img"] = reference_style(model, images)
        t = timed(fns, args.repeats, args.device)
        # IG: one call, after grad and SRD warmed the model up (its 50 steps amortise the rest)
        ig = method("ig", model, images, target, args.ig_steps, args.ig_batch)
        t["ig"] = timed({"ig": ig}, 1, args.device, warmup=False)["ig"]
        row = {"model": name, "seconds": t, "srd_over_grad": t["srd"] / t["grad"],
               "srd_over_ig": t["srd"] / t["ig"], "srd_seconds_per_image": t["srd"] / args.batch}
        if not args.no_memory:
            row["peak_bytes"] = {m: memory_in_subprocess(args, name, m) for m in METHODS}
        rows.append(row)
        print_row(row)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    result = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
              "timm": timm.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
              "size": args.size, "ig_steps": args.ig_steps, "dtype": "float32",
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "memory": "cuda max_memory_allocated" if args.device == "cuda" else "CPU RSS growth, fresh process",
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def print_row(row: dict) -> None:
    s, mem = row["seconds"], row.get("peak_bytes", {})
    mib = " ".join(f"{m} {mem[m] / 2**20:.0f}" for m in mem) or "-"
    ref = s.get("reference_style_1img")
    ref_txt = f" | reference-style {ref:.2f} s/img vs SRD {row['srd_seconds_per_image']:.2f} s/img" if ref else ""
    print(f"{row['model']}: grad {s['grad']:.2f}s  SRD {s['srd']:.2f}s  IG {s['ig']:.2f}s | "
          f"SRD/grad {row['srd_over_grad']:.2f} (target <= 4) | SRD/IG {row['srd_over_ig']:.3f} (target <= 0.2)"
          f"{ref_txt} | peak MiB {mib}")


if __name__ == "__main__":
    main()
