"""CAFE exemplars: batched latent iERFs, mass masks, the PNG, AUCs, ground truth, the stage.

The atlas is tiny: the train-sae tests' extraction (3 shards of 12 images at 64 px,
demo_resnet with seeded random weights) plus their two SAEs, and the scan stage's picks of a
handful of latents.
"""
from __future__ import annotations

import itertools
import zlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import srd
from pipeline.cafe import (
    CafeOptions,
    bbox,
    decode_png,
    encode_png,
    iou,
    mask_from_png,
    mass_masks,
    plan_cafe,
)
from pipeline.cafe.faithfulness import ORDERS, aucs, curves, patch_orders
from pipeline.cafe.groundtruth import GTObject, match, to_input_frame
from pipeline.cafe.ierf import as_shares, batched_latent_ierfs
from pipeline.data.errors import ErrorLog
from pipeline.data.shards import iter_samples
from pipeline.latents import ScanOptions
from pipeline.data.synthetic import render_sample
from pipeline.models import load_model, tap
from pipeline.sae.checkpoint import load_sae
from pipeline.sae.config import SAEConfig
from pipeline.sae.model import SAE
from pipeline.store import AtlasRoot
from pipeline.sae.stage import make_runs, train_runs
from pipeline.sae.train import LocalSession
from pipeline.store import Manifest, PartRecord, fs
from schemas import EXEMPLAR_PICKS, EXEMPLARS
from tiny import CHANNELS, SWEEP, TRAIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LATENTS = 3  # latents per SAE whose picks the stage tests explain
OPTS = CafeOptions(faithfulness_per_latent=1, steps=4, patch=16, image_batch=4)
IN_PROCESS = replace(OPTS, in_process=True)


class DriverCrash(BaseException):
    """Stands for the driver dying: not an Exception, so no part-level handler catches it."""


@pytest.fixture(scope="module")
def atlas(extracted, tmp_path_factory) -> str:  # this module's atlas: with the scan's picks
    """The extraction + both SAEs + the scan's picks (2 top, 1 quantile) of the first LATENTS
    latents that fire, per SAE."""
    from jobs.scan import run as scan

    root = str(tmp_path_factory.mktemp("cafe") / "atlas")
    shutil.copytree(extracted, root)
    runs = make_runs(SWEEP, CHANNELS, TRAIN)
    train_runs(root, runs, TRAIN, LocalSession(Path(root) / "_ckpt"))
    scan(root, ScanOptions(top_per_image=4, n_top=2, n_quantile=1, sample_size=4,
                           in_process=True), progress=False)
    for run in runs:
        url = fs.join(root, "exemplar_picks", f"sae={run.sae_id}", "part-000000.parquet")
        picks = fs.read_parquet(url)
        live = sorted(set(picks["latent"].to_pylist()))[:LATENTS]
        picks = picks.filter(pc.is_in(picks["latent"], value_set=pc.cast(live, "int32")))
        fs.write_parquet(picks, url, EXEMPLAR_PICKS)
    return root


def copy_of(root: str, dest: Path) -> str:
    shutil.copytree(root, dest)
    return str(dest)


def read_rows(root: str) -> list[dict]:
    rows = pq.read_table(fs.join(root, "exemplars")).to_pylist()
    return sorted(rows, key=lambda r: (r["sae_id"], r["latent"], r["kind"], r["rank"]))


# ---- latent iERFs ----------------------------------------------------------------------


def test_batched_latent_ierfs_equal_one_seed_at_a_time() -> None:
    torch.manual_seed(0)
    model = load_model("demo_resnet", None).model.eval()
    images = torch.randn(3, 3, 64, 64)
    positions = [torch.tensor([0, 5, 63]), torch.tensor([], dtype=torch.long), torch.tensor([9])]
    directions = [torch.randn(len(p), 32) for p in positions]
    offsets = [torch.randn(len(p)) for p in positions]
    graph = srd.build(model, images)[0]
    maps, consts = batched_latent_ierfs(model, graph, images, "layer2", positions, directions,
                                        offsets, chunk=2)
    assert [len(m) for m in maps] == [3, 0, 1]
    v = tap(model, images, ["layer2"])["layer2"].values  # [N, P, C]
    for i, (pos, dirs, offs) in enumerate(zip(positions, directions, offsets)):
        for s in range(len(pos)):
            one, c = srd.ierf(model, images[i:i + 1], "layer2", pos[s:s + 1], dirs[s:s + 1],
                              offset=offs[s:s + 1], return_constant=True)
            torch.testing.assert_close(maps[i][s], one[0, 0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(consts[i][s], c[0, 0], rtol=1e-4, atol=1e-6)
            # pixels + constant share = the readout <w, v_r> + offset (conservation)
            readout = float(v[i, pos[s]] @ dirs[s] + offs[s])
            assert float(one.sum() + c.sum()) == pytest.approx(readout, rel=1e-4, abs=1e-4)


def _pfvs(model: torch.nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    return tap(model, images, [layer])[layer].values  # [N, P, C], the model's dtype


def test_latent_firing_through_its_bias_keeps_its_sign() -> None:
    """A latent whose direction reads the PFV negatively (<w, v_r> < 0) but fires through its
    bias: its pixels sum to the (negative) data term, the bias is booked as constant, and the
    two add up to its pre-activation (docs/method.md §4). The directional ratio of the old rule
    (seed 1 divided by <w, v_r>) turned this map positive."""
    torch.manual_seed(0)
    model = load_model("demo_resnet", None).model.eval().double()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    v = _pfvs(model, images, "layer2")[0]  # [P, 32]
    r = int(v.norm(dim=1).argmax())
    sae = SAE(SAEConfig(d_in=32, n_latents=4, k=2)).double()
    with torch.no_grad():
        sae.scale.fill_(0.5)
        sae.b_dec.copy_(0.1 * torch.randn(32, dtype=torch.float64))
        sae.W_enc[0] = -v[r] / v[r].norm()  # reads v_r negatively ...
        sae.b_enc[0] = 0.5 * float(v[r].norm()) + float(sae.W_enc[0] @ sae.b_dec) + 1.0  # ... fires by bias
    with torch.no_grad():
        pre = sae._pre_acts(sae._normalise(v[r:r + 1]))[0, 0]
    w, b = sae.readout(torch.tensor([0]))
    data = float(w[0] @ v[r])
    assert data < 0 < float(pre) and float(b[0]) > float(pre)
    graph = srd.build(model, images)[0]
    maps, consts = batched_latent_ierfs(model, graph, images, "layer2", [torch.tensor([r])], [w], [b])
    pixels, const = float(maps[0][0].sum()), float(consts[0][0])
    assert pixels + const == pytest.approx(float(pre), rel=1e-9)
    assert pixels == pytest.approx(data, rel=1e-6)  # the data term is what the pixels explain
    shares, share_const = as_shares(maps[0], consts[0])
    assert float(shares.sum()) < 0 and float(shares.sum() + share_const) == pytest.approx(1.0)


def test_latent_ierf_sums_have_the_sign_of_their_data_term(atlas) -> None:
    """Property over the tiny atlas's trained SAEs: for every firing (position, latent) pair of a
    few synthetic scenes, the pixel sum of its latent iERF has the sign of its data term
    <w, v_r>, and pixels + constant = its pre-activation; latents that fire through their bias
    (data term <= 0) are among them."""
    root = AtlasRoot(atlas)
    loaded = root.model()
    model = loaded.model.double()
    images = torch.stack([loaded.transform(Image.fromarray(render_sample(7, i, 64)[0]))
                          for i in range(3)]).double()
    graph = srd.build(model, images)[0]
    through_bias = 0
    for row in root.saes():
        sae = load_sae(row["weights"]).double()
        v = _pfvs(model, images, row["layer"])  # [N, P, C]
        with torch.no_grad():
            acts = sae.encode(v)  # [N, P, F]
        fired = (acts > 0).nonzero()  # (image, position, latent)
        fired = fired[torch.randperm(len(fired), generator=torch.Generator().manual_seed(0))[:48]]
        w, b = sae.readout(fired[:, 2])
        data = (v[fired[:, 0], fired[:, 1]] * w).sum(1)
        pre = data + b
        positions = [fired[fired[:, 0] == i, 1] for i in range(len(images))]
        dirs = [w[fired[:, 0] == i] for i in range(len(images))]
        offs = [b[fired[:, 0] == i] for i in range(len(images))]
        maps, consts = batched_latent_ierfs(model, graph, images, row["layer"], positions, dirs, offs)
        sums = torch.cat([m.flatten(1).sum(1) for m in maps])
        order = torch.cat([(fired[:, 0] == i).nonzero()[:, 0] for i in range(len(images))])
        torch.testing.assert_close(sums + torch.cat(consts), pre[order], rtol=1e-6, atol=1e-6)
        assert (torch.sign(sums) == torch.sign(data[order])).all(), row["sae_id"]
        through_bias += int((data <= 0).sum())
    assert through_bias >= 3  # the case the rule is for occurs in real SAEs


# ---- masks and their PNG ---------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 1.0])
def test_mass_mask_is_the_smallest_set_holding_the_fraction(fraction) -> None:
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(20, 3, 4, generator=gen)
    maps[0] = -maps[0].abs()  # no positive relevance: empty mask
    maps[1] = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, -1, 0], [0, 0, 2, 0]])  # ties
    masks, thresholds = mass_masks(maps, fraction)
    pixels = range(12)
    for m, mask, thr in zip(maps, masks, thresholds):
        pos = m.flatten().clamp(min=0).double().numpy()
        total = pos.sum()
        if total == 0:
            assert not mask.any() and thr == 0
            continue
        smallest = next(k for k in range(1, 13) if any(
            pos[list(c)].sum() >= fraction * total - 1e-9
            for c in itertools.combinations(pixels, k)))
        chosen = mask.flatten().numpy()
        assert chosen.sum() == smallest
        assert pos[chosen].sum() >= fraction * total - 1e-6
        assert thr == pytest.approx(pos[chosen].min())


def test_png_round_trip_recovers_the_mask_exactly_and_keeps_the_order() -> None:
    gen = torch.Generator().manual_seed(2)
    maps = torch.randn(6, 32, 40, generator=gen)
    maps[1] = torch.round(maps[1] * 2) / 2  # many ties, also at the threshold
    maps[2] = -maps[2].abs()  # empty mask
    maps[3] = 0.0
    maps[3, 5, 7] = 1.0  # one pixel: max == threshold
    masks, thresholds = mass_masks(maps, 0.5)
    for m, mask, thr in zip(maps.numpy(), masks.numpy(), thresholds.numpy()):
        png = encode_png(m, mask, float(thr))
        assert np.array_equal(mask_from_png(png), mask)
        grey = decode_png(png).astype(np.int64).ravel()
        order = np.argsort(m.ravel(), kind="stable")
        pos = np.clip(m.ravel()[order], 0, None)
        g = grey[order]
        # monotone: a larger positive relevance never gets a darker grey
        assert np.all(np.diff(g)[np.diff(pos) > 0] >= 0)
        assert (g[pos <= 0] == 0).all()


def test_bbox_and_iou_of_hand_built_masks() -> None:
    a = np.zeros((6, 8), bool)
    a[1:3, 2:5] = True  # 6 pixels
    b = np.zeros((6, 8), bool)
    b[2:4, 4:6] = True  # 4 pixels, 1 shared
    assert bbox(a) == [2, 1, 5, 3] and bbox(np.zeros((3, 3), bool)) is None
    assert iou(a, b) == pytest.approx(1 / 9)
    assert iou(a, a) == 1.0 and iou(a & False, b & False) == 0.0


# ---- faithfulness ------------------------------------------------------------------------


def test_aucs_of_a_toy_readout_have_the_known_values() -> None:
    """4 patches of 2x2 px, 4 steps, the readout sees patch 0 only: iERF order puts it first,
    activation order last, so the areas are trapezoids of step functions known exactly."""
    image = torch.ones(3, 4, 4)

    def readout(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :2, :2].sum((1, 2, 3))

    ierf = torch.tensor([[4.0, 4, 3, 3], [4, 4, 3, 3], [2, 2, 1, 1], [2, 2, 1, 1]])
    orders = patch_orders(ierf, -ierf, 2, torch.Generator().manual_seed(0))
    assert orders["ierf"].tolist() == [0, 1, 2, 3] and orders["act"].tolist() == [3, 2, 1, 0]
    c = curves(image, orders, readout, patch=2, steps=4, batch=5)
    assert c.unmodified == 12.0
    assert c.deletion["ierf"].tolist() == [12, 0, 0, 0, 0]
    assert c.insertion["act"].tolist() == [0, 0, 0, 0, 12]
    got = aucs(c)
    assert got["del_auc_ierf"] == pytest.approx(0.125)
    assert got["ins_auc_ierf"] == pytest.approx(0.875)
    assert got["del_auc_act"] == pytest.approx(0.875) and got["ins_auc_act"] == pytest.approx(0.125)
    rank = orders["random"].tolist().index(0)  # patch 0 goes at step rank + 1
    assert got["del_auc_random"] == pytest.approx((rank + 0.5) / 4)
    assert got["ins_auc_random"] + got["del_auc_random"] == pytest.approx(1.0)
    assert set(ORDERS) == {"ierf", "act", "random"}


# ---- ground truth ------------------------------------------------------------------------


def test_ground_truth_is_the_object_the_mask_overlaps_most() -> None:
    def box(y0, y1, x0, x1):
        m = np.zeros((10, 10), bool)
        m[y0:y1, x0:x1] = True
        return m

    objs = [GTObject("circle", "red", "dots", box(0, 4, 0, 4)),
            GTObject("star", "blue", "solid", box(5, 10, 5, 10))]
    gt = match(box(6, 10, 6, 10), box(0, 2, 0, 2), objs)
    assert (gt["gt_shape"], gt["gt_colour"], gt["gt_texture"]) == ("star", "blue", "solid")
    assert gt["gt_iou_ierf"] == pytest.approx(16 / 25) and gt["gt_iou_act"] == 0.0
    assert match(box(0, 1, 9, 10), box(0, 1, 0, 1), objs)["gt_shape"] is None  # background
    assert match(box(0, 2, 0, 2), box(0, 2, 0, 2), [])["gt_iou_ierf"] is None


def test_masks_follow_the_resize_and_centre_crop_of_the_images() -> None:
    mask = np.zeros((20, 40), bool)
    mask[:, 10:20] = True  # a band in the left half
    cfg = {"input_size": (3, 8, 8), "crop_pct": 0.8, "crop_mode": "center"}
    # shorter side 20 -> floor(8 / 0.8) = 10, so 20x40 -> 10x20, then the middle 8x8 (x 6..13)
    out = to_input_frame(mask, cfg)
    assert out.shape == (8, 8)
    assert out[:, :4].all() and not out[:, 4:].any()


def test_reader_decodes_only_the_asked_images(extracted) -> None:
    from pipeline.store import Manifest

    shard = Manifest(extracted).records("extract")["part-000000"].input
    samples = list(iter_samples([shard], ErrorLog(), decode_image={"00000003"}))
    assert len(samples) == 12
    assert [s.key for s in samples if s.image is not None] == ["00000003"]


# ---- the stage -----------------------------------------------------------------------------


def test_stage_writes_one_consistent_row_per_pick(atlas, tmp_path) -> None:
    from jobs.cafe import run

    root = copy_of(atlas, tmp_path / "a")
    picks = plan_cafe(root, OPTS).picks
    summary = run(root, IN_PROCESS, progress=False)
    table = pq.read_table(fs.join(root, "exemplars"))
    assert table.schema.remove_metadata().equals(EXEMPLARS.remove_metadata(), check_metadata=False)
    rows = read_rows(root)
    assert len(rows) == picks == summary["exemplars"] and picks <= 2 * 3 * LATENTS
    assert {r["sae_id"] for r in rows} == {"layer2-topk-64-k4", "layer4-small"}
    saes = {row["sae_id"]: load_sae(row["weights"]) for row in AtlasRoot(root).saes()}
    for r in rows:
        mask = mask_from_png(r["ierf_png"])
        assert mask.shape == (128, 128)  # 64 px images, resized to the model input
        assert r["mask_frac"] == pytest.approx(mask.mean())
        assert r["bbox"] == bbox(mask)
        assert 0 <= r["act_overlap"] <= 1
        # the constant share: the latent's bias part over its pre-activation (the activation of
        # the pick, from float16 PFVs), as the network's own constants take almost nothing here
        _, offset = saes[r["sae_id"]].readout(torch.tensor([r["latent"]]))
        assert r["ierf_constant"] == pytest.approx(float(offset[0]) / r["activation"], rel=1e-2, abs=1e-3)
        faithful = r["kind"] == "top" and r["rank"] < OPTS.faithfulness_per_latent
        assert (r["ins_auc_ierf"] is not None) == faithful
        if faithful:  # areas in units of the exemplar's activation, over x in [0, 1]
            assert all(r[f"del_auc_{o}"] >= 0 for o in ORDERS)
        # synthetic images: the mask lands on an object, or every gt column is null
        assert (r["gt_shape"] is None) == (r["gt_iou_ierf"] is None)


def test_batched_faithfulness_equals_each_pick_checked_alone(atlas, tmp_path) -> None:
    """The stage streams the perturbed images of all checked picks of an image batch through
    shared forward passes (forward_batch 7 < the 20 images of a pick, so batches straddle
    picks); every AUC equals the pick's check run alone, as the stage did it before: its own
    iERF (one seed, one image), its own seeded orders, its 20 images in one forward of the
    whole image. The stage cropped both layers' images to each position's receptive field
    (`fieldcrop`; this untrained model's residual branches start at zero, so its fields are
    narrow) and gathered the model's stem from 16 sums per pick (`stem`)."""
    from jobs.cafe import run
    from pipeline.cafe import CafeWorker
    from pipeline.cafe.faithfulness import rows_per_exemplar
    from pipeline.cafe.masks import upsample
    from pipeline.models import make_transform

    opts = replace(IN_PROCESS, faithfulness_per_latent=2, image_batch=12, forward_batch=7)
    assert rows_per_exemplar(opts.steps) == 20
    root = copy_of(atlas, tmp_path / "a")
    run(root, opts, progress=False)
    checked = [r for r in read_rows(root) if r["ins_auc_ierf"] is not None]
    assert len({r["layer"] for r in checked}) == 2 and len(checked) >= 6
    worker = CafeWorker(plan_cafe(root, opts).context)
    for layer in ("layer2", "layer4"):
        size = worker.crop_of(layer, (128, 128)).size
        assert size[0] < 128 and worker.stem_of(layer, size) is not None
    transform = make_transform(worker.ctx.data_config)
    pixels = {}  # image_id -> preprocessed image, over every extracted part
    for part, record in Manifest(root).records("extract").items():
        images = fs.read_parquet(fs.join(root, "images", f"{part}.parquet"))
        ids = dict(zip(images["key"].to_pylist(), images["image_id"].to_pylist()))
        pixels.update({ids[s.key]: transform(s.image)
                       for s in iter_samples([record.input], ErrorLog())})
    with torch.no_grad():  # as in the stage (the SAE weights are leaves that need grad)
        for r in checked:
            x = pixels[r["image_id"]][None]
            sae = worker.sae(r["sae_id"])
            direction, offset = sae.readout(torch.tensor([r["latent"]]))
            graph = srd.build(worker.model, x)[0]
            maps, consts = batched_latent_ierfs(worker.model, graph, x, r["layer"],
                                                [torch.tensor([r["position"]])], [direction],
                                                [offset])
            ierf, _ = as_shares(maps[0], consts[0])
            grid = worker._act_maps(r["layer"], [r], _pfvs(worker.model, x, r["layer"])[0])
            gen = torch.Generator().manual_seed(zlib.crc32(
                f"{opts.seed}:{r['sae_id']}:{r['latent']}:{r['image_id']}".encode()))
            orders = patch_orders(ierf[0], upsample(grid, (128, 128))[0], opts.patch, gen)
            read = worker.readout(r["sae_id"], r["latent"], r["position"])
            layer = r["layer"]
            alone = aucs(curves(x[0], orders, lambda b: read(_pfvs(worker.model, b, layer)),
                                opts.patch, opts.steps, batch=20))
            for column, value in alone.items():
                assert r[column] == pytest.approx(value, rel=1e-5, abs=1e-6), (column, r["latent"])
    # the check can fail: the AUCs differ between picks
    assert len({round(r["ins_auc_ierf"], 6) for r in checked}) > 1


def test_crashed_driver_resumes_with_exact_row_counts(atlas, tmp_path) -> None:
    from jobs.cafe import run

    straight = copy_of(atlas, tmp_path / "straight")
    run(straight, IN_PROCESS, progress=False)

    def crash_after_first_part(record) -> None:
        raise DriverCrash(record.part)

    root = copy_of(atlas, tmp_path / "crashed")
    with pytest.raises(DriverCrash):
        run(root, IN_PROCESS, progress=False, on_part=crash_after_first_part)
    # what a crash mid-part leaves: an uncommitted part file and a temporary
    (Path(root) / "exemplars" / "part-000001.parquet").write_bytes(b"stale")
    (Path(root) / "exemplars" / ".part-000002.parquet.tmp-0123456789ab").write_bytes(b"half")
    summary = run(root, IN_PROCESS, progress=False)
    parts = summary["parts_done"]
    assert summary["parts_skipped"] == 1 and summary["parts_new"] == parts - 1
    a, b = read_rows(straight), read_rows(root)
    assert len(b) == len(a) == plan_cafe(root, OPTS).picks
    assert [(r["sae_id"], r["latent"], r["rank"], r["ierf_png"]) for r in b] == [
        (r["sae_id"], r["latent"], r["rank"], r["ierf_png"]) for r in a]
    assert run(root, IN_PROCESS, progress=False)["parts_new"] == 0


def test_other_options_in_the_same_atlas_are_refused_naming_the_key(atlas, tmp_path) -> None:
    root = copy_of(atlas, tmp_path / "a")
    plan_cafe(root, OPTS)
    # a config binds once a part was committed under it (a refused run's does not)
    Manifest(root).commit(PartRecord("cafe", "part-000000", "x.tar", "f", "h", rows=1))
    with pytest.raises(ValueError, match="mask_mass: 0.99 -> 0.3"):
        plan_cafe(root, CafeOptions(**{**OPTS.__dict__, "mask_mass": 0.3}))
    plan_cafe(root, CafeOptions(**{**OPTS.__dict__, "image_batch": 1}))  # speed only: accepted


def test_a_pick_of_an_unknown_image_is_an_error_row_not_an_exemplar(atlas, tmp_path) -> None:
    from jobs.cafe import run

    root = copy_of(atlas, tmp_path / "a")
    url = fs.join(root, "exemplar_picks", "sae=layer4-small", "part-000000.parquet")
    picks = fs.read_parquet(url)
    ghost = dict(picks.slice(0, 1).to_pylist()[0], image_id=999)  # part 0 has 12 images
    fs.write_parquet(pa.Table.from_pylist(picks.to_pylist() + [ghost], schema=EXEMPLAR_PICKS),
                     url, EXEMPLAR_PICKS)
    summary = run(root, IN_PROCESS, progress=False)
    assert summary["exemplars"] == plan_cafe(root, OPTS).picks - 1 and summary["errors"] == 1
    [error] = pq.read_table(fs.join(root, "errors", "stage=cafe")).to_pylist()
    assert "image_id 999 of a pick is not in the images table of part-000000" in error["reason"]
    assert 999 not in {r["image_id"] for r in read_rows(root)}


def test_picks_of_an_unknown_sae_are_refused_before_any_work(atlas, tmp_path) -> None:
    root = copy_of(atlas, tmp_path / "a")
    url = fs.join(root, "exemplar_picks", "sae=layer4-small", "part-000000.parquet")
    picks = fs.read_parquet(url)
    fs.write_parquet(picks.set_column(picks.schema.get_field_index("sae_id"), "sae_id",
                                      pa.array(["layer4-big"] * picks.num_rows)), url)
    with pytest.raises(ValueError, match="picks of SAE 'layer4-big', which is not trained here"):
        plan_cafe(root, OPTS)
    assert not (Path(root) / "stages" / "cafe.json").exists()


@pytest.mark.parametrize("kwargs, named", [({"mask_mass": 0}, "mask_mass=0"),
                                           ({"steps": 1}, "steps=1: expected an int >= 2"),
                                           ({"patch": 2.5}, "patch=2.5")])
def test_bad_options_are_refused_naming_the_value(kwargs, named) -> None:
    with pytest.raises(ValueError, match=named):
        CafeOptions(**kwargs)


@pytest.mark.ray
def test_on_ray_the_rows_equal_the_in_process_run(ray_cluster, atlas, tmp_path) -> None:
    from jobs.cafe import run

    local = copy_of(atlas, tmp_path / "local")
    run(local, IN_PROCESS, progress=False)
    root = copy_of(atlas, tmp_path / "ray")
    summary = run(root, replace(OPTS, actors=1, cpus_per_actor=0.5), progress=False)
    assert summary["parts_failed"] == {} and summary["exemplars"] == plan_cafe(root, OPTS).picks
    a, b = read_rows(local), read_rows(root)
    assert [r["ierf_png"] for r in a] == [r["ierf_png"] for r in b]
    assert [r["ins_auc_ierf"] for r in a] == pytest.approx([r["ins_auc_ierf"] for r in b],
                                                           abs=1e-5, nan_ok=True)
