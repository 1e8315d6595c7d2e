"""SAEs exported in SAELens's format (pipeline/sae/saelens.py, `concept-atlas export-sae`):
the installed `sae_lens` loads them and computes our encode/decode on real PFVs; the import
reads them (and SAELens's own saves) back to the same functions."""
from __future__ import annotations

import json

import pytest
import torch

from jobs.cli import main
from pipeline.pfv.parts import committed_parts, read_values
from pipeline.sae import SAE, SAEConfig, load_sae
from pipeline.sae.saelens import export_saelens, from_saelens, import_saelens, to_saelens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pfvs(root: str, layer: str) -> torch.Tensor:
    """The layer's stored PFVs (real activations of the tiny atlas's model), float32 [N, C]."""
    return torch.from_numpy(read_values(committed_parts(root, layer)))


def perturbed_sae(x: torch.Tensor, variant: str, dtype: str = "float64", seed: int = 0) -> SAE:
    """An SAE of `variant` fitted to `x`'s scale and centre, with encoder weights and biases
    moved off their initial values (as training would), its BatchTopK threshold set."""
    sae = SAE(SAEConfig(d_in=x.shape[1], n_latents=48, variant=variant, k=5, seed=seed,
                        dtype=dtype, b_dec_init="mean"))
    sae.initialize_from_sample(x)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen).to(sae.W_enc))
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=gen).to(sae.b_enc))
        if variant == "batchtopk":
            pre = sae._pre_acts(sae._normalise(x))
            sae.threshold.fill_(pre.clamp_min(0).quantile(0.9).item())
    return sae.eval()


def boundary_gap(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Per row, the gap between the k-th and (k+1)-th largest pre-activation of a TopK SAE."""
    top = sae._pre_acts(sae._normalise(x)).topk(sae.cfg.k + 1, dim=-1).values
    return top[:, -2] - top[:, -1]


# ---- the format, without sae_lens -----------------------------------------------------------


@pytest.mark.parametrize("variant", ["topk", "relu", "batchtopk"])
def test_export_then_import_is_the_same_sae(extracted, variant) -> None:
    x = pfvs(extracted, "layer4").double()
    sae = perturbed_sae(x, variant)
    cfg, state = to_saelens(sae, hook_name="layer4", model_name="demo_resnet")
    back = from_saelens(cfg, state)
    assert back.cfg == sae.cfg
    assert float(back.scale) == pytest.approx(float(sae.scale), rel=1e-12)
    acts, back_acts = sae.encode(x), back.encode(x)
    assert torch.equal(acts > 0, back_acts > 0)
    assert torch.allclose(back_acts, acts, rtol=1e-10, atol=1e-12)
    assert torch.allclose(back.decode(acts), sae.decode(acts), rtol=1e-10, atol=1e-12)
    # the decoder columns stay unit-norm in the normalised space (docs/method.md §5)
    assert torch.allclose(back.W_dec.norm(dim=0), torch.ones(48, dtype=torch.float64))
    assert (acts > 0).sum(dim=1).float().mean() > 1  # the comparison is not between zeros


def test_the_folded_weights_compute_our_pre_activations(extracted) -> None:
    """SAELens's formulas (pre = (x - b_dec') @ W_enc' + b_enc', x_hat = a @ W_dec' + b_dec')
    written out on the exported tensors give our pre-activations and reconstructions."""
    x = pfvs(extracted, "layer2").double()
    sae = perturbed_sae(x, "relu")
    assert float(sae.scale) != pytest.approx(1.0, abs=0.1)  # the fold is exercised
    _, st = to_saelens(sae, hook_name="layer2")
    pre = (x - st["b_dec"]) @ st["W_enc"] + st["b_enc"]
    assert torch.allclose(pre, sae._pre_acts(sae._normalise(x)), rtol=1e-10, atol=1e-10)
    a = sae.encode(x)
    assert torch.allclose(a @ st["W_dec"] + st["b_dec"], sae.decode(a), rtol=1e-10, atol=1e-10)


def test_an_untrained_batchtopk_sae_is_refused() -> None:
    sae = SAE(SAEConfig(d_in=8, n_latents=16, variant="batchtopk", k=2))
    with pytest.raises(ValueError, match="batchtopk SAE has no inference threshold"):
        to_saelens(sae, hook_name="layer2")


def test_sae_lens_features_we_cannot_express_are_refused(extracted) -> None:
    x = pfvs(extracted, "layer2").double()
    cfg, st = to_saelens(perturbed_sae(x, "topk"), hook_name="layer2")
    with pytest.raises(ValueError, match="'layer_norm' transforms each input"):
        from_saelens(dict(cfg, normalize_activations="layer_norm"), st)
    with pytest.raises(ValueError, match="architecture 'gated'"):
        from_saelens(dict(cfg, architecture="gated"), st)
    # a TopK SAE whose decoder rows have unequal norms: folding them would change the winners
    uneven = dict(st, W_dec=st["W_dec"] * torch.linspace(0.5, 2.0, 48, dtype=torch.float64)[:, None])
    with pytest.raises(ValueError, match="unequal norms"):
        from_saelens(dict(cfg, metadata={}), uneven)
    # per-latent JumpReLU thresholds: ours has one
    cfg_j, st_j = to_saelens(perturbed_sae(x, "batchtopk"), hook_name="layer2")
    st_j["threshold"] = torch.linspace(0.0, 1.0, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match="per-latent thresholds"):
        from_saelens(cfg_j, st_j)


def test_cli_round_trip_of_the_atlas_saes(atlas, tmp_path, capsys) -> None:
    """`export-sae` then `import-sae` of every SAE of the tiny atlas: the same encode/decode on
    the layer's real PFVs as the atlas's own SAE, to float32 rounding."""
    from pipeline.atlas import Atlas

    out = tmp_path / "saelens"
    assert main(["export-sae", atlas, str(out)]) == 0
    lines = capsys.readouterr().out.split()
    at = Atlas.open(atlas)
    assert sorted(lines) == sorted(str(out / s) for s in at.saes)
    for sae_id, row in at.saes.items():
        cfg = json.loads((out / sae_id / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == row["layer"]
        assert cfg["metadata"]["model_name"] == "demo_resnet"
        assert cfg["architecture"] == "topk" and cfg["k"] == row["k"]
        assert cfg["d_in"] == row["d_in"] and cfg["d_sae"] == row["n_latents"]
        assert cfg["metadata"]["concept_atlas"]["heldout"]["fvu"] == row["fvu"]
        assert main(["import-sae", str(out / sae_id), str(tmp_path / "back" / sae_id)]) == 0
        back, ours = load_sae(tmp_path / "back" / sae_id), at.sae(sae_id)
        x = pfvs(atlas, row["layer"])
        a, b = ours.encode(x), back.encode(x)
        same = ((a > 0) == (b > 0)).all(dim=1)
        # a row may swap its k-th latent only where two pre-activations tie to rounding
        assert (boundary_gap(ours, x)[~same] < 1e-4).all()
        assert same.float().mean() > 0.99
        assert torch.allclose(a[same], b[same], rtol=1e-5, atol=1e-5)
        scale = (x.norm(dim=1).max()).item()
        assert (ours.decode(a) - back.decode(a)).abs().max() <= 1e-5 * scale
    assert main(["export-sae", atlas, str(out), "--layer", "nope"]) == 2
    assert "unknown layer or SAE 'nope'" in capsys.readouterr().err


def test_import_sae_names_a_missing_file(tmp_path, capsys) -> None:
    assert main(["import-sae", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "cfg.json not found" in capsys.readouterr().err


# ---- the installed sae_lens --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae_lens is not installed (pip install -e '.[dev]')")


@pytest.mark.parametrize("variant,cls", [("topk", "TopKSAE"), ("relu", "StandardSAE"),
                                         ("batchtopk", "JumpReLUSAE")])
def test_sae_lens_computes_our_encode_decode(sae_lens, extracted, tmp_path, variant, cls) -> None:
    x = pfvs(extracted, "layer4").double()
    sae = perturbed_sae(x, variant)
    folder = export_saelens(sae, tmp_path / variant, hook_name="layer4", model_name="demo_resnet")
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == cls
    assert theirs.cfg.metadata.hook_name == "layer4" and theirs.cfg.d_sae == 48
    with torch.no_grad():
        acts = theirs.encode(x)
        assert torch.equal(acts > 0, sae.encode(x) > 0)
        assert torch.allclose(acts, sae.encode(x), rtol=1e-10, atol=1e-12)
        assert torch.allclose(theirs.decode(acts), sae.decode(acts), rtol=1e-10, atol=1e-12)
        assert torch.allclose(theirs(x), sae.decode(sae.encode(x)), rtol=1e-10, atol=1e-12)


def test_sae_lens_loads_the_atlas_export(sae_lens, atlas, tmp_path) -> None:
    """The float32 SAEs the tiny atlas trained, exported by the CLI and loaded by sae_lens."""
    from pipeline.atlas import Atlas

    assert main(["export-sae", atlas, str(tmp_path), "--layer", "layer4"]) == 0
    at = Atlas.open(atlas)
    (sae_id,) = at.expand(["layer4"])
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / sae_id))
    ours, x = at.sae(sae_id), pfvs(atlas, "layer4")
    with torch.no_grad():
        a, b = ours.encode(x), theirs.encode(x)
        same = ((a > 0) == (b > 0)).all(dim=1)
        assert (boundary_gap(ours, x)[~same] < 1e-4).all() and same.float().mean() > 0.99
        assert torch.allclose(b[same], a[same], rtol=1e-5, atol=1e-5)
        err = (theirs.decode(a) - ours.decode(a)).abs().max()
        assert err <= 1e-5 * x.norm(dim=1).max()


def test_an_sae_saved_by_sae_lens_imports(sae_lens, extracted, tmp_path) -> None:
    """A StandardSAE with unequal decoder norms, saved by sae_lens itself: the import folds each
    norm into its latent (activations scaled by it) and reconstructs the same PFVs."""
    x = pfvs(extracted, "layer2").double()
    cfg = sae_lens.StandardSAEConfig(d_in=x.shape[1], d_sae=40, dtype="float64",
                                     apply_b_dec_to_input=False)
    theirs = sae_lens.StandardSAE(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (theirs.W_enc, theirs.W_dec, theirs.b_enc, theirs.b_dec):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    theirs.save_model(tmp_path / "std")
    ours, _ = import_saelens(tmp_path / "std")
    assert ours.cfg.variant == "relu"
    assert torch.allclose(ours.W_dec.norm(dim=0), torch.ones(40, dtype=torch.float64))
    with torch.no_grad():
        norms = theirs.W_dec.norm(dim=1)
        acts = theirs.encode(x)
        assert (acts > 0).any(dim=1).float().mean() > 0.5
        assert torch.allclose(ours.encode(x), acts * norms * float(ours.scale), rtol=1e-10,
                              atol=1e-10)
        assert torch.allclose(ours.decode(ours.encode(x)), theirs(x), rtol=1e-10, atol=1e-10)
