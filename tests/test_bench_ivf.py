"""bench.py search --ivf (bench_search.run_ivf): the recall column and the run end to end, tiny (CPU)."""
import numpy as np
import pytest

import bench
from cxr import bench_search

faiss = pytest.importorskip("faiss")


def test_recall_at_k_counts_the_exact_neighbours_found():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert bench_search.recall_at_k(exact, exact) == 1.0
    assert bench_search.recall_at_k(exact[:, ::-1], exact) == 1.0  # order within the top k is ignored
    found = np.array([[3, 9, 0, -1], [-1, -1, -1, -1]])  # faiss pads with -1: never a hit
    assert bench_search.recall_at_k(found, exact) == 2 / 8


def test_clustered_gallery_is_unit_float16_and_queries_are_not_rows():
    gallery, queries, clusters, query_clusters = bench_search.make_clustered_gallery(1000, 16, 5, centres=20)
    assert clusters.shape == (1000,) and query_clusters.shape == (5,) and int(clusters.max()) < 20
    assert gallery.dtype.is_floating_point and gallery.element_size() == 2 and gallery.shape == (1000, 16)
    assert np.allclose(gallery.float().norm(dim=1).numpy(), 1, atol=2e-3)
    assert np.allclose(queries.norm(dim=1).numpy(), 1, atol=1e-5)
    nearest = (queries @ gallery.float().T).max(dim=1).values
    assert (nearest < 0.999).all()  # drawn apart from the gallery
    again, *_ = bench_search.make_clustered_gallery(1000, 16, 5, centres=20)
    assert (again == gallery).all()  # the same seed: the same gallery in every case's process


def test_cli_ivf_visiting_every_list_recalls_everything(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    args = bench.get_args_parser().parse_args(
        ["search", "--device", "cpu", "--ivf", "16", "--ivf-nprobe", "1,16,64", "--search-n", "20000",
         "--search-dim", "32", "--search-queries", "20", "--steps", "1", "--threads", "1",
         "--output", str(output)])
    rows = bench.main(args)["search"]
    assert [row["nprobe"] for row in rows] == [1, 16]  # nprobe is capped at nlist
    assert rows[-1]["recall"] == 1.0  # all lists visited: the exact neighbours
    assert 0 < rows[0]["recall"] < 1.0
    assert all(row["seconds"] > 0 and row["vs_exact"] > 0 for row in rows)
    text = output.read_text()
    assert "## search: faiss IVF (nlist 16) vs exact top-10 (cpu)" in text
    assert "--ivf 16 --ivf-nprobe 1,16,64" in text and "| IVF nprobe 16 | 100.00% |" in text
    assert "| 16 | 4,096 |" in text  # the build table: nlist, training rows
    assert "| exact, again |" in text and "DIFFER" not in text  # the gallery made again is the same
