"""ICAT: isolated layer pairs, edge scores, aggregation, the icat stage and its resume.

Scores are checked on float64 models with random weights and SAEs initialised from the
model's own PFVs; the stage runs on the tiny atlas of tests/test_train_sae_job.py (3 shards of
12 images, demo_resnet with seeded random weights) after an in-process SAE training.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from tiny import ICAT, copy_of

import jobs.icat
from pipeline.icat.aggregate import (
    check_memory_limit,
    combine,
    edge_rows,
    reduce_partials,
    sort_edges,
    top_incoming,
)
from pipeline.icat.attribution import (
    Decomposed,
    LayerSAE,
    PairScores,
    Readout,
    attribute,
    downstream_rows,
    quadrature,
)
from pipeline.icat.protocol import auc, curves
from pipeline.icat.segment import LOGITS, Segment
from pipeline.icat.srd_scores import srd_scores
from pipeline.icat.stage import MAP_STAGE, ICATOptions
from pipeline.models import list_layers, load_model, tap
from pipeline.sae import SAE, SAEConfig
from pipeline.store import Manifest, fs
from schemas import EDGES


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(name, None, **kwargs).model.double()


def _sae(pfvs: torch.Tensor, positions: torch.Tensor, layer: str, n_latents: int, k: int) -> LayerSAE:
    sae = SAE(SAEConfig(d_in=pfvs.shape[-1], n_latents=n_latents, k=k, seed=1)).double()
    sae.initialize_from_sample(pfvs[:, positions].reshape(-1, pfvs.shape[-1]))
    return LayerSAE(layer, sae.eval(), positions)


# ---- pair isolation ----------------------------------------------------------------------

SEGMENTS = [
    ("demo_resnet", {}, 64, "layer2", "layer4", True),
    ("demo_resnet", {}, 64, "act1", "layer1", True),
    ("demo_resnet", {}, 64, "layer4", LOGITS, True),
    ("demo_resnet", {}, 64, "layer1.0.bn1", "layer3", False),  # inside a block: hook fallback
    ("vit_tiny_patch16_224", {"img_size": 32}, 32, "blocks.1", "blocks.3", True),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32, "blocks.2", LOGITS, True),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32, "patch_embed", "blocks.0", False),
    ("efficientnet_lite0", {}, 64, "blocks.2", "blocks.4", True),
    ("efficientnet_lite0", {}, 64, "blocks.5", LOGITS, True),
]


@pytest.mark.parametrize("name,kwargs,size,src,dst,isolated", SEGMENTS)
def test_segment_output_equals_the_full_models_layer(name, kwargs, size, src, dst, isolated) -> None:
    model = _model(name, **kwargs)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    specs = {s.name: s for s in list_layers(model, (size, size))}
    segment = Segment(model, src, dst, specs)
    assert segment.isolated is isolated
    taps = tap(model, x, [src] + ([] if dst == LOGITS else [dst]))
    with torch.no_grad():
        out = segment(taps[src].values, x)
        ref = model(x) if dst == LOGITS else taps[dst].values
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_segment_runs_only_the_modules_between_the_layers() -> None:
    model = _model("demo_resnet")
    specs = {s.name: s for s in list_layers(model, (64, 64))}
    ran: list[str] = []
    for path, mod in model.named_modules():
        if path.count(".") == 1 and path.startswith("layer"):
            mod.register_forward_hook(lambda m, i, o, p=path: ran.append(p))
    x = tap(model, torch.randn(1, 3, 64, 64, dtype=torch.float64), ["layer2"])["layer2"].values
    ran.clear()
    Segment(model, "layer2", "layer4", specs)(x)
    assert ran == ["layer3.0", "layer4.0"]
    with pytest.raises(ValueError, match="does not come after"):
        Segment(model, "layer4", "layer2", specs)


# ---- scores ------------------------------------------------------------------------------


def _pair(name: str, kwargs: dict, size: int, src: str, dst: str, prefix_free: bool):
    model = _model(name, **kwargs)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    specs = {s.name: s for s in list_layers(model, (size, size))}
    taps = tap(model, x, [src] + ([] if dst == LOGITS else [dst]))

    def positions(layer: str) -> torch.Tensor:
        spec = specs[layer]
        total = taps[layer].values.shape[1]
        return torch.arange(spec.num_special if prefix_free else 0, total)

    up = _sae(taps[src].values, positions(src), src, 48, 4)
    down = None if dst == LOGITS else _sae(taps[dst].values, positions(dst), dst, 64, 6)
    segment = Segment(model, src, dst, specs)
    dec = Decomposed.of(up, taps[src].values)
    readout = Readout(down)
    image, node, mask = downstream_rows(segment, dec, x, readout, labels=torch.tensor([1, -1, 2]))
    return model, x, segment, dec, readout, down, taps, image[:8], node[:8], \
        None if mask is None else mask[:8]


PAIRS = [
    ("demo_resnet", {}, 64, "layer2", "layer3", False),
    ("demo_resnet", {}, 64, "layer3", LOGITS, False),
    # CLS token outside the SAE: held at its recorded value, relevance booked to the error node
    ("vit_tiny_patch16_224", {"img_size": 32}, 32, "blocks.0", "blocks.2", True),
    # a CLS head: the logit row is the class readout of the CLS token (docs/method.md §3.3)
    ("vit_tiny_patch16_224", {"img_size": 32}, 32, "blocks.10", LOGITS, True),
]


@pytest.mark.parametrize("scale_error", [False, True])
@pytest.mark.parametrize("case", PAIRS, ids=lambda c: f"{c[0]}:{c[3]}->{c[4]}")
def test_ig_completeness_error_shrinks_with_steps(case, scale_error) -> None:
    _, x, segment, dec, readout, _, _, image, node, mask = _pair(*case)
    assert len(image) > 0
    errors = []
    for steps in (2, 8, 32):
        s = attribute(segment, dec, readout, image, node, mask, x, methods=("ig",), steps=steps,
                      scale_error=scale_error)
        # fixed error: the error node holds g(dec(0) + err), so the row sums to g(x);
        # scaled error: the error node holds its IG share, the row sums to g(x) - g(dec(0))
        target = s.value - s.baseline if scale_error else s.value
        errors.append(float(((s.scores["ig"].sum(1) - target).abs() / s.value.abs()).max()))
    assert errors[2] < errors[0] and errors[2] < 0.02, errors
    # the baseline really is the path's start: a row with every latent zeroed
    full, _ = dec.at(image, 0.0, 0.0 if scale_error else 1.0)
    with torch.no_grad():
        torch.testing.assert_close(readout(segment(full, x[image]), node, mask), s.baseline)


@pytest.mark.parametrize("case", PAIRS, ids=lambda c: f"{c[0]}:{c[3]}->{c[4]}")
def test_gradient_scores_equal_autograd_per_latent_and_finite_differences(case) -> None:
    _, x, segment, dec, readout, _, _, image, node, mask = _pair(*case)
    s = attribute(segment, dec, readout, image, node, mask, x, methods=("grad_x_act", "grad"))
    up = dec.up
    for q in range(min(4, len(image))):
        n = int(image[q])
        a = dec.acts[n].clone().requires_grad_(True)

        def g(acts: torch.Tensor) -> torch.Tensor:
            full = dec.pfvs[n][None].clone()
            full[:, up.positions] = up.sae.decode(acts)[None] + dec.err[n][None]
            return readout(segment(full, x[n:n + 1]), node[q:q + 1],
                           None if mask is None else mask[q:q + 1])[0]

        (grad,) = torch.autograd.grad(g(a), a)
        torch.testing.assert_close(s.scores["grad_x_act"][q, :-1], (grad * a).sum(0).detach())
        torch.testing.assert_close(s.scores["grad"][q, :-1], (grad * (a > 0)).sum(0).detach())
        # central finite difference along "scale latent f at every position": d/dt g(a + t a_f)
        f = int(a.detach().sum(0).argmax())
        bump = torch.zeros_like(a)
        bump[:, f] = a.detach()[:, f]
        eps = 1e-6
        with torch.no_grad():
            fd = (g(a.detach() + eps * bump) - g(a.detach() - eps * bump)) / (2 * eps)
        assert float(s.scores["grad_x_act"][q, f]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)
        # error node: derivative along the SAE error
        d = torch.zeros_like(dec.pfvs[n][None])
        d[:, up.positions] = dec.err[n]
        with torch.no_grad():
            base = dec.pfvs[n][None]
            gp = readout(segment(base + eps * d, x[n:n + 1]), node[q:q + 1],
                         None if mask is None else mask[q:q + 1])
            gm = readout(segment(base - eps * d, x[n:n + 1]), node[q:q + 1],
                         None if mask is None else mask[q:q + 1])
        assert float(s.scores["grad_x_act"][q, -1]) == pytest.approx(
            float((gp - gm) / (2 * eps)), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("case", PAIRS, ids=lambda c: f"{c[0]}:{c[3]}->{c[4]}")
def test_srd_scores_conserve_the_downstream_value(case) -> None:
    model, x, segment, dec, readout, down, taps, image, node, mask = _pair(*case)
    down_acts = None if down is None else down.encode(taps[down.layer].values)
    s = srd_scores(model, x, dec, down, down_acts, image, node, chunk=5)
    value = attribute(segment, dec, readout, image, node, mask, x, methods=("grad",)).value
    torch.testing.assert_close(s.sum(1), value, rtol=1e-8, atol=1e-10)
    # a latent absent from the image gets no share
    absent = ~(dec.acts[image] > 0).any(1)
    assert float(s[:, :-1][absent].abs().max()) == 0.0


def test_quadrature_integrates_polynomials_exactly() -> None:
    nodes, weights = quadrature(5)
    assert float((weights * nodes ** 9).sum()) == pytest.approx(0.1, abs=1e-14)
    nodes, weights = quadrature(4, "riemann")
    assert nodes.tolist() == [0.125, 0.375, 0.625, 0.875] and weights.sum() == 1.0
    with pytest.raises(ValueError, match="rule="):
        quadrature(4, "simpson")


# ---- protocol ----------------------------------------------------------------------------


def test_protocol_curves_end_at_the_full_value_and_at_the_error_only_value() -> None:
    _, x, segment, dec, readout, _, _, image, node, mask = _pair(*PAIRS[0])
    s = attribute(segment, dec, readout, image[:2], node[:2], mask[:2], x, steps=8)
    c = curves(segment, dec, readout, int(image[0]), int(node[0]), mask[:1],
               {m: s.scores[m][0] for m in s.scores}, x, points=8, random_orders=2)
    full_in = 1.0
    empty = float(s.baseline[0] / s.value[0])  # g(dec(0) + err) / g(x)
    for name in list(s.scores) + ["random"]:
        assert c.insertion[name][0] == pytest.approx(empty) and c.insertion[name][-1] == pytest.approx(full_in)
        assert c.deletion[name][0] == pytest.approx(full_in) and c.deletion[name][-1] == pytest.approx(empty)
    assert auc(np.array([0.0, 1.0])) == 0.5


# ---- aggregation -------------------------------------------------------------------------


def _random_scores(rng: np.random.Generator, q: int, f: int, n_images: int) -> PairScores:
    w = rng.normal(size=(q, f + 1)) * (rng.random((q, f + 1)) < 0.4)
    return PairScores(torch.as_tensor(rng.integers(0, n_images, q)), torch.as_tensor(rng.integers(0, 5, q)),
                      torch.zeros(q), torch.zeros(q), {"ig": torch.as_tensor(w)})


def test_aggregation_and_top_k_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, -1, 1])
    batches = [_random_scores(rng, 30, 7, 4) for _ in range(3)]
    tables = [edge_rows({"ig": s}, labels, "a", "b", "t") for s in batches]
    got = combine([combine(tables[:2], "t"), tables[2]], "t")  # partials combine like rows
    assert got.schema == EDGES
    want: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for s in batches:
        w = s.scores["ig"].numpy()
        for q, f in zip(*np.nonzero(w)):
            src = -1 if f == w.shape[1] - 1 else int(f)
            label = labels[int(s.image[q])]
            for scope in ["all"] + ([f"class={label}"] if label >= 0 else []):
                key = (src, int(s.node[q]), scope)
                want[key][0] += w[q, f]
                want[key][1] += 1
    rows = {(r["src_latent"], r["dst_latent"], r["scope"]): (r["weight"], r["n_images"])
            for r in got.to_pylist()}
    assert rows.keys() == want.keys()
    for key, (weight, count) in rows.items():
        assert weight == pytest.approx(want[key][0]) and count == want[key][1]

    for top, min_weight in [(2, 0.0), (3, 0.5), (100, 0.0)]:
        kept = top_incoming(got, top, min_weight)
        groups: dict[tuple, list[tuple]] = defaultdict(list)
        for key, (weight, _) in rows.items():
            groups[(key[1], key[2])].append((key[0], weight))
        expect = set()
        for (dst, scope), edges in groups.items():
            lat = sorted((e for e in edges if e[0] != -1), key=lambda e: (-abs(e[1]), e[0]))
            expect |= {(s, dst, scope) for s, w in lat[:top] if abs(w) >= min_weight}
            expect |= {(s, dst, scope) for s, _ in edges if s == -1}
        assert {(r["src_latent"], r["dst_latent"], r["scope"]) for r in kept.to_pylist()} == expect


PAIRS_OF_PARTIALS = [("a", "b"), ("b", "logits")]


def _random_partials(rng: np.random.Generator, files: int, rows: int, dyadic: bool) -> list[pa.Table]:
    """Partial EDGES tables (one row per key, as the map writes them) over two layer pairs,
    two methods, four scopes and error nodes; dyadic weights (k/8) give exact sums and ties."""
    out = []
    for _ in range(files):
        pair = rng.integers(0, 2, rows)
        weight = (rng.integers(-8, 9, rows) / 8.0 if dyadic
                  else rng.normal(size=rows) * 10.0 ** rng.integers(-6, 4, rows))
        out.append(combine([pa.table({
            "atlas_id": ["t"] * rows,
            "src_layer": np.array(["a", "b"])[pair], "src_latent": rng.integers(-1, 12, rows).astype(np.int32),
            "dst_layer": np.array(["b", "logits"])[pair], "dst_latent": rng.integers(0, 4, rows).astype(np.int32),
            "method": rng.choice(["ig", "grad"], rows), "scope": rng.choice(["all", "class=0", "class=7"], rows),
            "weight": weight, "n_images": rng.integers(1, 5, rows)}).cast(EDGES)], "t"))
    return out


def _write_partials(tables: list[pa.Table], folder: str) -> list[str]:
    files = [fs.join(folder, f"part-{i:06d}.parquet") for i in range(len(tables))]
    for table, url in zip(tables, files):
        fs.write_parquet(table, url, EDGES)
    return files


def _reduce(files: list[str], top: int, min_weight: float = 0.0, **kwargs) -> list[pa.Table]:
    return [r.read_all() for r in reduce_partials(files, PAIRS_OF_PARTIALS, "t", top, min_weight, **kwargs)]


def test_duckdb_reduce_equals_brute_force_sums_and_top_k(tmp_path) -> None:
    rng = np.random.default_rng(3)
    partials = _random_partials(rng, 6, 300, dyadic=True)
    files = _write_partials(partials, str(tmp_path))
    sums: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    for table in partials:
        for r in table.to_pylist():
            key = tuple(r[k] for k in ("src_layer", "src_latent", "dst_layer", "dst_latent", "method", "scope"))
            sums[key][0] += r["weight"]
            sums[key][1] += r["n_images"]
    groups: dict[tuple, list] = defaultdict(list)
    for key, value in sums.items():
        groups[key[:1] + key[2:]].append((key, value))
    memory = combine(partials, "t")
    for top, min_weight in [(2, 0.0), (3, 0.5), (100, 0.0)]:
        got = _reduce(files, top, min_weight)
        want, ties = [], 0
        for edges in groups.values():
            lat = sorted((e for e in edges if e[0][1] != -1 and abs(e[1][0]) >= min_weight),
                         key=lambda e: (-abs(e[1][0]), e[0][1]))
            want += lat[:top] + [e for e in edges if e[0][1] == -1]
            ties += len(lat) > top and abs(lat[top - 1][1][0]) == abs(lat[top][1][0])
        assert ties > 0 or top == 100  # the tie-break by src_latent decides real cuts
        for (a, b), table in zip(PAIRS_OF_PARTIALS, got):
            assert table.schema == EDGES
            assert table.equals(sort_edges(table))  # already in the deterministic order
            rows = {tuple(r[k] for k in ("src_layer", "src_latent", "dst_layer", "dst_latent", "method", "scope")):
                    [r["weight"], r["n_images"]] for r in table.to_pylist()}
            assert rows == {k: v for k, v in want if k[0] == a and k[2] == b}  # exact: dyadic sums
            assert table.equals(top_incoming(
                memory.filter(pc.equal(memory.column("src_layer"), a)), top, min_weight))
    assert sum(t.num_rows for t in _reduce(files, 100)) == len(sums)
    assert _reduce([], 3) == [EDGES.empty_table()] * 2


def test_duckdb_reduce_is_bit_identical_whatever_the_threads_file_order_and_filesystem(tmp_path) -> None:
    rng = np.random.default_rng(4)
    partials = _random_partials(rng, 8, 400, dyadic=False)
    files = _write_partials(partials, str(tmp_path))
    ref = _reduce(files, 100, threads=1)
    assert _reduce(files[::-1], 100, threads=2) == ref
    remote = _write_partials(partials, f"memory://{tmp_path.name}/icat_partial")
    assert _reduce(remote, 100) == ref
    memory = combine(partials, "t")
    got = pa.concat_tables(ref)
    assert got.num_rows == memory.num_rows
    assert got.drop_columns(["weight"]).equals(memory.drop_columns(["weight"]))
    np.testing.assert_allclose(got.column("weight"), memory.column("weight"), rtol=1e-12)
    bad = partials[0].set_column(7, "weight", pa.array([np.nan] + [1.0] * (partials[0].num_rows - 1)))
    fs.write_parquet(bad, str(tmp_path / "bad.parquet"), EDGES)
    with pytest.raises(ValueError, match="weight nan in .*bad.parquet: expected a finite"):
        _reduce(files + [str(tmp_path / "bad.parquet")], 3)


def test_duckdb_reduce_runs_under_a_memory_limit_below_the_partials(tmp_path) -> None:
    rng = np.random.default_rng(5)
    n, files = 250_000, []
    for i in range(6):  # nearly every key distinct, so the sums are as large as the partials
        table = pa.table({
            "atlas_id": pa.array(["t"] * n), "src_layer": pa.array(["a"] * n),
            "src_latent": rng.integers(-1, 4000, n).astype(np.int32), "dst_layer": pa.array(["b"] * n),
            "dst_latent": rng.integers(0, 200, n).astype(np.int32), "method": pa.array(["ig"] * n),
            "scope": pa.array([f"class={c}" for c in range(20)]).take(rng.integers(0, 20, n)),
            "weight": rng.normal(size=n), "n_images": np.ones(n, np.int64)}).cast(EDGES)
        files += _write_partials([table], str(tmp_path / str(i)))
    concatenated = sum(pq.read_table(f).nbytes for f in files)
    limit_mb = 48
    assert concatenated > 1.5 * limit_mb * 2 ** 20
    [edges, _] = _reduce(files, 4, memory_limit=f"{limit_mb}MB", threads=1)
    # 200 dst latents x 20 scopes, each with 4 latents and (nearly always) its error node
    assert 200 * 20 * 4 <= edges.num_rows <= 200 * 20 * 5
    assert edges.equals(sort_edges(edges))


# ---- the stage ---------------------------------------------------------------------------

IN_PROCESS = ICAT  # the options of the shared `straight` fixture (tests/conftest.py)
STAGE_OPTIONS = dataclasses.replace(ICAT, in_process=False)


def _edges(root: str) -> pa.Table:
    return pq.read_table(fs.join(root, "edges")).sort_by([(k, "ascending") for k in EDGES.names])


def test_stage_writes_edges_with_error_nodes_and_scopes(straight) -> None:
    root, summary = straight
    assert summary["pairs"] == ["layer2->layer4", "layer4->logits"]
    assert summary["parts_done"] == 3 and summary["images"] == 6
    edges = _edges(root)
    assert edges.schema.metadata[b"table"] == b"edges"
    assert edges.num_rows == sum(summary["edges"].values())
    rows = edges.to_pylist()
    assert {r["method"] for r in rows} == {"ig", "grad_x_act", "grad", "srd"}
    assert {r["dst_layer"] for r in rows} == {"layer4", "logits"}
    assert any(r["src_latent"] == -1 for r in rows)
    assert any(r["scope"].startswith("class=") for r in rows)
    per_node = defaultdict(int)
    for r in rows:
        if r["src_latent"] != -1:
            per_node[(r["dst_layer"], r["dst_latent"], r["method"], r["scope"])] += 1
    assert max(per_node.values()) <= STAGE_OPTIONS.top_edges
    # a scope's image count never exceeds the images scored
    assert max(r["n_images"] for r in rows) <= 6


def test_stage_resumes_after_a_crash_with_the_rows_of_an_uninterrupted_run(straight, atlas, tmp_path) -> None:
    ref_root, _ = straight
    root = copy_of(atlas, tmp_path / "crashed")

    def crash(record) -> None:
        raise RuntimeError(f"driver killed after {record.part}")

    with pytest.raises(RuntimeError, match="driver killed after part-000000"):
        jobs.icat.run(root, IN_PROCESS, progress=False, on_part=crash)
    assert sorted(Manifest(root).records(MAP_STAGE)) == ["part-000000"]
    assert not fs.exists(fs.join(root, "edges"))
    summary = jobs.icat.run(root, IN_PROCESS, progress=False)
    assert summary["parts_new"] == 2 and summary["parts_done"] == 3
    ref = Manifest(ref_root).records(MAP_STAGE)
    got = Manifest(root).records(MAP_STAGE)
    assert {p: r.outputs for p, r in got.items()} == {p: r.outputs for p, r in ref.items()}
    assert _edges(root).num_rows == _edges(ref_root).num_rows
    assert _edges(root).drop_columns(["weight"]).equals(_edges(ref_root).drop_columns(["weight"]))
    np.testing.assert_allclose(_edges(root).column("weight"), _edges(ref_root).column("weight"),
                               rtol=1e-5)
    reduced = Manifest(root).records("icat")
    again = jobs.icat.run(root, IN_PROCESS, progress=False)
    assert again["parts_new"] == 0 and _edges(root).num_rows == _edges(ref_root).num_rows
    assert Manifest(root).records("icat") == reduced  # nothing new: the reduce is skipped too


def test_stage_refuses_another_config_in_the_same_root(straight) -> None:
    root, _ = straight
    with pytest.raises(ValueError, match="steps"):
        jobs.icat.run(root, ICATOptions(steps=8, images_per_shard=2, top_edges=4,
                                        in_process=True), progress=False)


def test_bad_options_name_the_value(tmp_path) -> None:
    with pytest.raises(ValueError, match="methods="):
        ICATOptions(methods=("ig", "lrp"))
    with pytest.raises(ValueError, match="rule="):
        ICATOptions(rule="simpson")
    # a bad reduce memory limit fails before anything is planned or scored
    for bad in ("lots", "4 G", 4):
        with pytest.raises(ValueError, match="reduce_memory="):
            jobs.icat.run(str(tmp_path / "no-atlas"), ICATOptions(reduce_memory=bad,
                                                                  in_process=True))
    assert check_memory_limit("512MiB") == "512MiB" and check_memory_limit("1.5GB") == "1.5GB"


@pytest.mark.ray
def test_ray_job_writes_the_edges_of_the_in_process_run(ray_cluster, straight, atlas, tmp_path) -> None:
    ref_root, _ = straight
    root = copy_of(atlas, tmp_path / "ray")
    summary = jobs.icat.run(root, dataclasses.replace(STAGE_OPTIONS, cpus_per_actor=0.5),
                            address=ray_cluster, progress=False)
    assert summary["parts_new"] == 3 and not summary["parts_failed"]
    assert _edges(root).drop_columns(["weight"]).equals(_edges(ref_root).drop_columns(["weight"]))
    np.testing.assert_allclose(_edges(root).column("weight"), _edges(ref_root).column("weight"),
                               rtol=1e-5)
