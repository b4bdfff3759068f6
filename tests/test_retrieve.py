"""retrieve.py: index, resume, append, query, fingerprint and format checks, exact search; the
OOD guard by default, labelled query lists, contact sheets."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrieve
import train
from cxr import contact_sheet, gallery_index, ood_detector, search
from cxr.checkpoints import load_trained_model
from cxr.errors import UserError
from cxr.retrieval_metrics import rank_topk
from test_train import ckpt, phantoms, tiny_args  # noqa: F401  (the phantoms fixture)


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):  # noqa: F811
    save_dir = tmp_path_factory.mktemp("run")
    train.main(tiny_args(phantoms, save_dir, "--epochs", "1"))
    return ckpt(save_dir, "best")


def index_argv(checkpoint, phantoms, out, *extra):  # noqa: F811
    return ["index", "--resume", str(checkpoint), "--image-list", str(phantoms / "train_split.txt"),
            "--dataset-dir", str(phantoms / "train"), "--out", str(out), "--workers", "0",
            "--device", "cpu", *extra]


def test_search_is_exact_with_index_ties():
    generator = torch.Generator().manual_seed(0)
    gallery = torch.randint(-2, 3, (300, 4), generator=generator).float()  # many exact ties
    queries = torch.randint(-2, 3, (20, 4), generator=generator).float()
    scores, indices = search.search(queries, gallery, k=7, chunk_size=64)
    ref_scores, ref_indices = rank_topk(queries, gallery, 7)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices, ref_indices)  # the same tie rule as test.py's metrics
    half_scores, _ = search.search(queries, gallery.half(), k=7, chunk_size=50)
    torch.testing.assert_close(half_scores, ref_scores)  # small integers are exact in float16


def reference_search(queries, gallery, k, chunk_size):
    """The slow reference: every similarity (one matrix product per chunk of the gallery, as
    search.search computes them), then a full stable descending sort of each row."""
    queries = queries.float()
    sims = torch.cat([queries @ gallery[s:s + chunk_size].float().T
                      for s in range(0, len(gallery), chunk_size)], dim=1)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), order


def search_gallery(kind, n, dim, generator):
    if kind == "random":  # unit vectors: ties only by accident
        gallery = torch.randn(n, dim, generator=generator)
        return gallery / gallery.norm(dim=1, keepdim=True)
    if kind == "duplicates":  # each of a few rows many times: long runs of equal scores
        rows = torch.randn(7, dim, generator=generator)
        return rows[torch.randint(0, 7, (n,), generator=generator)]
    # quantised to halves in [-1, 1]: few distinct dot products, exact in float16 and float32
    return torch.randint(-2, 3, (n, dim), generator=generator).float() / 2


@pytest.mark.parametrize("kind", ["random", "duplicates", "quantised"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_search_equals_a_full_stable_sort(kind, dtype, chunk_size):
    generator = torch.Generator().manual_seed(chunk_size)
    n, dim = 300, 8
    gallery = search_gallery(kind, n, dim, generator).to(dtype)
    queries = search_gallery(kind, 20, dim, generator)
    if kind == "quantised":
        queries = queries.round()  # -1, 0 or 1: fewer distinct scores, more ties
    for k in (1, 10, 12, 65, n, n + 5):  # past a chunk's candidates, the whole gallery
        scores, indices = search.search(queries, gallery, k, chunk_size=chunk_size)
        ref_scores, ref_indices = reference_search(queries, gallery, min(k, n), chunk_size)
        assert scores.dtype == torch.float32 and indices.dtype == torch.int64
        assert torch.equal(indices, ref_indices), f"k={k}"
        assert torch.equal(scores, ref_scores), f"k={k}"  # bit for bit
    if kind != "random":  # the data does put equal scores across the cut the top-k has to make
        sorted_scores = reference_search(queries, gallery, n, chunk_size)[0]
        assert (sorted_scores[:, 9] == sorted_scores[:, 10]).sum() >= 10


def test_search_ties_everywhere_and_nan_rank_as_a_stable_sort():
    gallery = torch.ones(500, 4, dtype=torch.float16)  # every score equal: the k lowest indices
    queries = torch.ones(3, 4)
    scores, indices = search.search(queries, gallery, 10, chunk_size=128)
    assert torch.equal(indices, torch.arange(10).expand(3, 10)) and torch.equal(scores, torch.full((3, 10), 4.0))
    gallery = torch.randn(400, 4, generator=torch.Generator().manual_seed(1))
    gallery[[3, 150, 151, 390]] = float("nan")  # NaN sorts first in torch.sort, in index order
    gallery[200:260] = gallery[20]  # and a run of equal scores
    for chunk_size in (50, 128):
        for k in (2, 4, 6, 30):
            scores, indices = search.search(queries, gallery, k, chunk_size=chunk_size)
            ref_scores, ref_indices = reference_search(queries, gallery, k, chunk_size)
            assert torch.equal(indices, ref_indices)
            torch.testing.assert_close(scores, ref_scores, equal_nan=True, rtol=0, atol=0)


def test_search_edge_cases():
    gallery = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    queries = gallery[:5]
    scores, indices = search.search(queries, gallery, 0)
    assert scores.shape == indices.shape == (5, 0)
    scores, indices = search.search(queries, gallery[:0], 3)
    assert scores.shape == indices.shape == (5, 0)
    with pytest.raises(ValueError):
        search.search(queries, gallery, -1)
    with pytest.raises(ValueError):
        search.search(queries, gallery, 3, chunk_size=0)
    # the numbers are the same as the reference's whatever the (gallery) dtype, e.g. float64
    scores, indices = search.search(queries, gallery.double(), 3, chunk_size=16)
    ref_scores, ref_indices = reference_search(queries, gallery, 3, 16)
    assert torch.equal(indices, ref_indices) and torch.equal(scores, ref_scores)
    scores, indices = search.search(queries.clone().requires_grad_(), gallery, 3, chunk_size=16)
    assert torch.equal(indices, ref_indices) and not scores.requires_grad


def test_index_query_and_test_py_agree(trained, phantoms, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "gallery.index"
    retrieve.main(index_argv(trained, phantoms, out, "--chunk-size", "7"))
    manifest, embeddings, labels, paths = gallery_index.load_index(out)
    assert len(paths) == 30 and embeddings.shape == (30, 16) and len(manifest["chunks"]) == 5
    test_list = [line.split() for line in (phantoms / "test_split.txt").read_text().splitlines()]
    images = [str(phantoms / "test" / fields[1]) for fields in test_list]
    results = retrieve.main(["query", "--index", str(out), "--resume", str(trained), *images,
                             "--topk", "5", "--out", str(tmp_path / "q"), "--device", "cpu"])
    on_disk = json.loads((tmp_path / "q" / "results.json").read_text())
    assert len(on_disk["queries"]) == 25 and len(on_disk["queries"][0]["neighbours"]) == 5
    for record in on_disk["queries"]:
        sims = [n["similarity"] for n in record["neighbours"]]
        assert sims == sorted(sims, reverse=True)
        assert record["vote"] in record["votes"] and sum(record["votes"].values()) == 5
    assert (tmp_path / "q" / "0000_phantom_test_00000.png").is_file()
    assert all(Path(n["path"]).is_file() for r in on_disk["queries"] for n in r["neighbours"])
    assert "vote" in capsys.readouterr().out
    # two code paths, one number: top-1 label agreement equals test.py's query-gallery R@1
    top1 = np.mean([r["neighbours"][0]["label"] == fields[2] for r, fields in zip(results, test_list)])
    import test as evaluate_cli
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(trained), "--test-dataset-dir", str(phantoms / "test"), "--test-image-list",
        str(phantoms / "test_split.txt"), "--gallery-dataset-dir", str(phantoms / "train"),
        "--gallery-image-list", str(phantoms / "train_split.txt"), "--workers", "0", "--device", "cpu",
        "--report", str(tmp_path / "r.json"), "--save-dir", str(tmp_path)]))
    assert 100 * top1 == pytest.approx(report["recall_at_k"]["1"], abs=1e-9)


def test_interrupted_index_resumes_and_append_adds_only_new_images(trained, phantoms, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "idx"
    real_write = gallery_index.write_npz
    calls = {"n": 0}

    def dies_on_third_chunk(path, **arrays):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill during the third chunk
        real_write(path, **arrays)

    monkeypatch.setattr(gallery_index, "write_npz", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        retrieve.main(index_argv(trained, phantoms, out, "--chunk-size", "8"))
    assert len(gallery_index.read_manifest(out)["chunks"]) == 2  # the two finished chunks survive
    monkeypatch.setattr(gallery_index, "write_npz", real_write)
    retrieve.main(index_argv(trained, phantoms, out, "--chunk-size", "8"))
    _, resumed, _, paths = gallery_index.load_index(out)
    retrieve.main(index_argv(trained, phantoms, tmp_path / "straight", "--chunk-size", "8"))
    _, straight, _, straight_paths = gallery_index.load_index(tmp_path / "straight")
    assert paths == straight_paths and len(paths) == 30  # no image twice, none missing
    np.testing.assert_allclose(resumed, straight, rtol=1e-5, atol=1e-6)

    # append: the test images join the index; a second append adds nothing
    append = ["index", "--resume", str(trained), "--image-list", str(phantoms / "test_split.txt"),
              "--dataset-dir", str(phantoms / "test"), "--out", str(out), "--workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--append"):
        retrieve.main(append)
    retrieve.main([*append, "--append"])
    retrieve.main([*append, "--append"])
    paths = gallery_index.load_index(out)[3]
    assert len(paths) == 55 and all(Path(p).is_file() for p in paths)  # each from its own folder
    assert sum("/test/" in p for p in paths) == 25
    with pytest.raises(SystemExit, match="stores float32"):
        retrieve.main([*append, "--append", "--dtype", "float16"])


def test_fingerprint_truncation_and_format_errors(trained, phantoms, tmp_path):  # noqa: F811
    out = tmp_path / "idx"
    retrieve.main(index_argv(trained, phantoms, out, "--dtype", "float16"))
    assert gallery_index.load_index(out)[1].dtype == np.float16
    other = tmp_path / "other.pth"
    state = torch.load(trained, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other)
    image = str(phantoms / "test" / "phantom_test_00000.png")
    with pytest.raises(SystemExit, match="not the model that built"):
        retrieve.main(["query", "--index", str(out), "--resume", str(other), image, "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="another model"):
        retrieve.main(index_argv(other, phantoms, out, "--append"))

    chunk = out / gallery_index.read_manifest(out)["chunks"][0]["file"]
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit, match="truncated or unreadable"):
        retrieve.main(["query", "--index", str(out), "--resume", str(trained), image, "--out", str(tmp_path / "q")])
    shutil.rmtree(out)
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 3}))
    with pytest.raises(SystemExit, match="is not a version 1"):
        retrieve.main(["query", "--index", str(out), "--resume", str(trained), image, "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="not a retrieval index"):
        retrieve.main(["query", "--index", str(tmp_path), "--resume", str(trained), image,
                       "--out", str(tmp_path / "q")])


def test_unreadable_query_images_need_the_flag(trained, phantoms, tmp_path):  # noqa: F811
    out = tmp_path / "idx"
    retrieve.main(index_argv(trained, phantoms, out))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    good = str(phantoms / "test" / "phantom_test_00000.png")
    query = ["query", "--index", str(out), "--resume", str(trained), good, str(bad), "--out", str(tmp_path / "q")]
    with pytest.raises(SystemExit, match="bad.png"):
        retrieve.main(query)
    results = retrieve.main([*query, "--skip-bad-images"])
    assert [r["query"] for r in results] == [good]
    with pytest.raises(SystemExit, match="--topk 0"):
        retrieve.main([*query, "--topk", "0"])


def test_index_built_with_relative_paths_answers_from_another_folder(trained, phantoms, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(phantoms.parent)
    relative = Path(phantoms.name)
    argv = ["index", "--resume", str(trained), "--image-list", str(relative / "train_split.txt"),
            "--dataset-dir", str(relative / "train"), "--out", str(tmp_path / "idx"), "--workers", "0",
            "--device", "cpu"]
    retrieve.main(argv)
    dotted = [a.replace(str(relative / "train"), f"./{relative}/train") for a in argv]
    retrieve.main(dotted)  # the same folder spelt another way: nothing to embed, no error
    assert len(gallery_index.load_index(tmp_path / "idx")[3]) == 30
    monkeypatch.chdir(tmp_path)
    paths = gallery_index.load_index(tmp_path / "idx")[3]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def test_query_with_explain_draws_heat_maps(trained, phantoms, tmp_path):  # noqa: F811
    out = tmp_path / "idx"
    retrieve.main(index_argv(trained, phantoms, out, "--dtype", "float16"))
    image = str(phantoms / "test" / "phantom_test_00003.png")
    common = ["query", "--index", str(out), "--resume", str(trained), image, "--topk", "4", "--device", "cpu"]
    plain = retrieve.main([*common, "--out", str(tmp_path / "plain")])[0]
    explained = retrieve.main([*common, "--explain", "--out", str(tmp_path / "explained")])[0]
    assert plain["neighbours"] == explained["neighbours"] and "explanation" not in plain
    x, y = explained["explanation"]["peak_xy"]
    assert 0 <= x < 64 and 0 <= y < 64
    sheets = [np.asarray(Image.open(r["contact_sheet"]).convert("RGB"), dtype=float) for r in (plain, explained)]
    assert sheets[0].shape == sheets[1].shape and np.abs(sheets[0] - sheets[1]).mean() > 5  # coloured maps


def test_optional_faiss_index(trained, phantoms, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "idx"
    images = [str(phantoms / "test" / f"phantom_test_{i:05d}.png") for i in range(6)]
    query = ["query", "--index", str(out), "--resume", str(trained), *images, "--topk", "5", "--device", "cpu"]
    pytest.importorskip("faiss")  # an optional dependency; requirements_hybrid.txt installs it
    monkeypatch.setattr(gallery_index, "FAISS_ADD_CHUNK", 7)  # rows added in 5 float32 chunks, in order
    retrieve.main(index_argv(trained, phantoms, out, "--faiss-ivf", "4", "--chunk-size", "8"))
    assert gallery_index.read_manifest(out)["faiss"]["count"] == 30
    exact = retrieve.main([*query, "--out", str(tmp_path / "e")])
    # visiting every cluster is an exhaustive search: the same neighbours as the exact scan
    approximate = retrieve.main([*query, "--search", "faiss", "--nprobe", "4", "--out", str(tmp_path / "f")])
    for e, f in zip(exact, approximate):
        assert [n["path"] for n in e["neighbours"]] == [n["path"] for n in f["neighbours"]]
        assert [n["similarity"] for n in e["neighbours"]] == pytest.approx(
            [n["similarity"] for n in f["neighbours"]], abs=1e-5)
    # one cluster of four holds fewer than 30 images: faiss pads with -1, which must not become
    # the last gallery image
    few = retrieve.main([*query[:-4], "--topk", "30", "--device", "cpu", "--search", "faiss", "--nprobe", "1",
                         "--out", str(tmp_path / "few")])
    for record in few:
        paths = [n["path"] for n in record["neighbours"]]
        assert 0 < len(paths) < 30 and len(set(paths)) == len(paths)
        assert sum(record["votes"].values()) == len(paths)
    # appending without rebuilding drops the stale faiss index, and --search faiss says so
    append = ["index", "--resume", str(trained), "--image-list", str(phantoms / "test_split.txt"),
              "--dataset-dir", str(phantoms / "test"), "--out", str(out), "--workers", "0", "--device", "cpu",
              "--append"]
    retrieve.main(append)
    with pytest.raises(UserError, match="no up-to-date faiss index"):
        retrieve.main([*query, "--search", "faiss", "--out", str(tmp_path / "g")])
    with pytest.raises(UserError, match="more clusters"):
        retrieve.main(index_argv(trained, phantoms, tmp_path / "small", "--faiss-ivf", "100"))
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # as if not installed
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        retrieve.main([*query, "--search", "faiss", "--out", str(tmp_path / "h")])


def save_detector(checkpoint, fingerprint, threshold):
    """A detector beside `checkpoint` (where ood.py saves it) for the model of `fingerprint`, every
    threshold `threshold`: -10 flags every query (no score is below it: the distances and 1 - msp
    are >= 0, the energy >= -(1 + log 5 / 16)), 1e9 none. Fitted on random 16-d unit vectors:
    only the count of flags is tested, not the detector's quality (ood.py's tests do that)."""
    x = torch.nn.functional.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    detector = ood_detector.OODDetector(k=3, fingerprint=fingerprint).fit(x, np.arange(40) % 5, list("abcde"))
    detector.thresholds, detector.tpr = {name: threshold for name in ood_detector.SCORES}, 0.95
    detector.save(ood_detector.default_detector_path(checkpoint))


def test_query_uses_the_detector_beside_the_checkpoint_by_default(trained, phantoms, tmp_path, capsys):  # noqa: F811
    index = tmp_path / "idx"
    retrieve.main(index_argv(trained, phantoms, index))
    checkpoint = tmp_path / trained.name  # a folder of its own: the shared checkpoint keeps no detector
    shutil.copy(trained, checkpoint)
    fingerprint = load_trained_model(checkpoint, "cpu")[2]
    images = [str(phantoms / "test" / f"phantom_test_{i:05d}.png") for i in range(3)]
    common = ["query", "--index", str(index), "--resume", str(checkpoint), *images, "--topk", "3", "--device", "cpu"]

    def query(name, *extra):
        results = retrieve.main([*common, *extra, "--out", str(tmp_path / name)])
        return results, json.loads((tmp_path / name / "results.json").read_text()), capsys.readouterr()

    capsys.readouterr()
    plain, on_disk, printed = query("plain")  # no detector: as before, and one note on how to fit one
    assert "no OOD detector found" in printed.err and f"ood.py --resume {checkpoint}" in printed.err
    assert "ood" not in on_disk and not any("ood" in r for r in plain)

    save_detector(checkpoint, fingerprint, -10.0)
    guarded, on_disk, printed = query("guarded")
    assert "3 of 3 queries out of distribution" in printed.out
    assert on_disk["ood"] == {"detector": str(ood_detector.default_detector_path(checkpoint)), "score": "mahalanobis",
                              "flagged": 3, "queries": 3}
    assert all(r["ood"]["flagged"] for r in on_disk["queries"])
    assert [r["neighbours"] for r in guarded] == [r["neighbours"] for r in plain]  # a flag, not another search
    save_detector(checkpoint, fingerprint, 1e9)
    _, on_disk, printed = query("accepted")
    assert "0 of 3 queries out of distribution" in printed.out and on_disk["ood"]["flagged"] == 0

    off, on_disk, printed = query("off", "--no-ood")
    assert "ood" not in on_disk and not any("ood" in r for r in off) and "OOD" not in printed.err

    save_detector(checkpoint, "0" * 64, -10.0)  # fitted for another model: a warning, no flags
    stale, on_disk, printed = query("stale")
    assert "warning:" in printed.err and "another model" in printed.err and "ood" not in on_disk
    with pytest.raises(UserError, match="another model"):  # asked for: the error it was
        query("stale_required", "--ood")
    ood_detector.default_detector_path(checkpoint).unlink()
    with pytest.raises(UserError, match="no OOD detector"):
        query("missing_required", "--ood")


def test_query_image_list_carries_labels_and_marks_the_vote(trained, phantoms, tmp_path, capsys):  # noqa: F811
    index = tmp_path / "idx"
    retrieve.main(index_argv(trained, phantoms, index))
    lines = (phantoms / "test_split.txt").read_text().splitlines()[::4]  # every class
    films = tmp_path / "films"  # the list beside its images: --dataset-dir defaults to its folder
    films.mkdir()
    for line in lines:
        shutil.copy(phantoms / "test" / line.split()[1], films)
    (films / "queries.txt").write_text("\n".join(lines) + "\n")
    loose = str(phantoms / "test" / "phantom_test_00001.png")  # a file named on the command line
    common = ["query", "--index", str(index), "--resume", str(trained), "--topk", "5", "--device", "cpu"]
    capsys.readouterr()
    retrieve.main([*common, loose, "--image-list", str(films / "queries.txt"), "--out", str(tmp_path / "q")])
    on_disk = json.loads((tmp_path / "q" / "results.json").read_text())
    first, *listed = on_disk["queries"]
    assert first["query"] == loose and "label" not in first and "correct" not in first
    assert [r["label"] for r in listed] == [line.split()[2] for line in lines]
    assert [Path(r["query"]).name for r in listed] == [line.split()[1] for line in lines]
    for record in listed:
        assert record["correct"] == (record["vote"] == record["label"])
        assert Path(record["contact_sheet"]).is_file()
    right = sum(r["correct"] for r in listed)
    assert on_disk["labelled"] == {"queries": len(lines), "correct": right}
    assert f"vote right for {right} of {len(lines)} labelled queries" in capsys.readouterr().out
    # the list read from another folder (--dataset-dir), as `index` reads it
    again = retrieve.main([*common, "--image-list", str(phantoms / "test_split.txt"), "--dataset-dir",
                           str(phantoms / "test"), "--out", str(tmp_path / "all")])
    assert len(again) == 25 and all("label" in r for r in again)
    with pytest.raises(UserError, match="--image-list"):  # a folder without its list
        retrieve.main([*common, "--dataset-dir", str(films), "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="no query images"):
        retrieve.main([*common, "--out", str(tmp_path / "x")])


def test_wrap_keeps_long_file_names_whole():
    face = contact_sheet.font(14)
    title = "QUERY person1947_bacteria_48.png"
    assert face.getlength(title) > 148  # wider than a tile's caption: the old sheet cut it
    lines = contact_sheet.wrap(title, face, 148)
    assert lines == ["QUERY person1947_", "bacteria_48.png"]  # broken after the underscore
    unbroken = "x" * 60  # no place to break: between characters, nothing lost
    lines = contact_sheet.wrap(unbroken, face, 100)
    assert len(lines) > 1 and "".join(lines) == unbroken
    assert all(face.getlength(line) <= 100 for line in lines)
    assert contact_sheet.wrap("", face, 100) == [""]


def test_contact_sheet_frames_a_labelled_query_right_or_wrong(phantoms, tmp_path):  # noqa: F811
    query = tmp_path / "person1947_bacteria_48_with_a_much_longer_name.png"
    shutil.copy(phantoms / "test" / "phantom_test_00000.png", query)
    neighbours = [{"path": str(phantoms / "train" / f"phantom_train_{i:05d}.png"), "label": "normal",
                   "similarity": 0.9 - i / 10} for i in range(3)]
    record = {"neighbours": neighbours, "vote": "normal"}
    sheets = {}
    for name, extra in (("plain", {}), ("right", {"label": "normal", "correct": True}),
                        ("wrong", {"label": "pneumonia", "correct": False})):
        path = contact_sheet.draw(query, {**record, **extra}, tmp_path / f"{name}.png")
        sheets[name] = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    r, g, b = sheets["right"][1, 1]
    assert g > r + 50 and g > b + 50  # the query tile's frame: green when the vote is right
    r, g, b = sheets["wrong"][1, 1]
    assert r > g + 100 and r > b + 100  # red when wrong
    assert tuple(sheets["plain"][1, 1]) == (255, 255, 255)  # no label, no frame
    # the long name wraps over four caption lines, the label adds one: every row is taller
    assert sheets["right"].shape[0] > sheets["plain"].shape[0]
    # neighbours: right or wrong by the query's own label (here: each is normal), not by the vote
    wrong = contact_sheet.captions(query, {**record, "label": "pneumonia", "correct": False})[1:]
    assert all(texts[0].endswith("WRONG") and colour == "red" for _, texts, colour in wrong)
    right = contact_sheet.captions(query, {**record, "label": "normal", "correct": True})[1:]
    assert all(texts[0].endswith("right") and colour == "darkgreen" for _, texts, colour in right)
    unlabelled = contact_sheet.captions(query, {**record, "vote": "pneumonia"})[1:]
    assert all("right" not in texts[0] and "WRONG" not in texts[0] for _, texts, _ in unlabelled)


def test_index_with_cache_dir_embeds_as_without(trained, phantoms, tmp_path):  # noqa: F811
    from cxr.image_cache import ImageCache
    retrieve.main(index_argv(trained, phantoms, tmp_path / "plain"))
    retrieve.main(index_argv(trained, phantoms, tmp_path / "cached", "--cache-dir", str(tmp_path / "cache")))
    _, plain, _, _ = gallery_index.load_index(tmp_path / "plain")
    _, cached, _, _ = gallery_index.load_index(tmp_path / "cached")
    assert ImageCache(tmp_path / "cache", img_size=32).summary()[0] == 30  # every gallery image once
    cosine = (torch.as_tensor(plain).float() * torch.as_tensor(cached).float()).sum(1)
    assert cosine.min() > 0.95  # the same images up to one extra resampling
