"""bench.py: the paths it compares compute the same thing, and the CLI runs end to end (CPU, small)."""
import time

import numpy as np
import pytest
import torch

import bench
from cxr import bench_metrics, bench_train, retrieval_metrics

SMALL = ["--device", "cpu", "--img-size", "32", "-p", "3", "-k", "2", "--batch-size", "6"]
OPTIMISED = frozenset({"bf16", "channels_last", "fused", "checkpointing"})


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are all small ops; on a shared 2-core machine a second OpenMP thread spins
    # against other processes and makes them several times slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_argv(suite):
    return bench_train.train_argv(bench.get_args_parser().parse_args([suite, *SMALL]))


def tied_embeddings(n, dim, classes, seed):
    """Integer-valued vectors: their dot products are exact in float32, so equal similarities
    really tie whatever the matmul kernel; a few duplicated rows add ties of whole rankings."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randint(-2, 3, (n, dim), generator=generator).float()
    embeddings[n // 2:n // 2 + 10] = embeddings[:10]
    labels = torch.randint(classes, (n,), generator=generator)
    labels[-1] = classes  # a label with one image: a query with no relevant item
    return embeddings, labels


@pytest.mark.parametrize("seed, dim, classes", [(0, 4, 3), (1, 8, 2), (2, 3, 4)])
def test_seed_algorithm_equals_evaluate_retrieval(seed, dim, classes):
    embeddings, labels = tied_embeddings(200, dim, classes, seed)
    similarities = embeddings @ embeddings.T
    assert len(torch.unique(similarities)) < 100  # ties everywhere: the tie rule matters
    reference = dict(bench_metrics._flatten(bench_metrics.seed_evaluate_retrieval(embeddings, labels)))
    fast = dict(bench_metrics._flatten(retrieval_metrics.evaluate_retrieval(embeddings, labels)))
    assert reference.keys() <= fast.keys()  # and MAP@R, R-precision, which the seed lacks
    for key, value in reference.items():
        if key == "/map":  # AP terms are summed in float32-rounded fixed point (cxr/ranking.py)
            assert fast[key] == pytest.approx(value, abs=1e-6), key
        elif isinstance(value, int):  # confusion matrices
            assert fast[key] == value, key
        else:
            assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert bench_metrics.max_difference(reference, fast) <= bench_metrics.EQUAL_TOL


def test_max_difference_flags_any_mismatch():
    embeddings, labels = tied_embeddings(60, 4, 3, 0)
    result = retrieval_metrics.evaluate_retrieval(embeddings, labels)
    changed = retrieval_metrics.evaluate_retrieval(embeddings, labels)
    changed["classification"]["5"]["confusion_matrix"][0][0] += 1
    assert bench_metrics.max_difference(result, result) == 0.0
    assert bench_metrics.max_difference(result, changed) == 1.0
    del changed["recall_at_k"]["1"]
    assert bench_metrics.max_difference(result, changed) == float("inf")


def test_optimised_embeddings_match_fp32():
    argv = small_argv("embed")
    plain = bench_train.embed_case(argv, frozenset(), 1, 0)["embeddings"]
    optimised = bench_train.embed_case(argv, frozenset({"bf16", "channels_last"}), 1, 0)["embeddings"]
    assert plain.shape == optimised.shape == (6, 128)
    cosine = (plain * optimised).sum(1)  # both unit vectors
    assert np.all(cosine > 0.99), cosine
    assert not np.array_equal(plain, optimised)  # bf16 really ran


def test_onnxruntime_row_embeds_as_pytorch(tmp_path):
    argv = bench_train.train_argv(bench.get_args_parser().parse_args(["embed", "--device", "cpu", "--batch-size", "6"]))
    plain = bench_train.embed_case(argv, frozenset(), 1, 0)["embeddings"]
    result = bench_train.onnxruntime_case(argv, 1, 0, tmp_path)
    assert result["images_per_s"] > 0 and np.abs(result["embeddings"] - plain).max() <= 1e-4


def test_optimised_train_steps_match_plain():
    # P x K = 3 x 4 and a small learning rate: the second loss follows the first update without
    # the chaos of a tiny random batch at the demo rate.
    argv = bench_train.train_argv(bench.get_args_parser().parse_args(
        ["train", "--device", "cpu", "--img-size", "32", "-p", "3", "-k", "4"]))
    argv += ["--lr", "1e-4", "--warmup-epochs", "0"]
    plain = bench_train.train_case(argv, frozenset(), 2, 0)["losses"]
    assert plain[0] > 0.05 and plain[1] < plain[0] - 0.01  # losses that can disagree
    # fp32 with the other three optimisations: the same arithmetic up to summation order.
    exact = bench_train.train_case(argv, frozenset({"channels_last", "fused", "checkpointing"}), 2, 0)["losses"]
    assert exact == pytest.approx(plain, abs=1e-4)
    # bf16 autocast on top: the first loss sees the same weights, so only the forward's
    # precision differs (the identity loss scales cosines by 16). The update then differs more
    # than rounding: Adam's first step is about lr * sign(gradient), and bf16 flips the sign of
    # the small gradient entries; so the second loss must fall, not match.
    optimised = bench_train.train_case(argv, OPTIMISED, 2, 0)["losses"]
    assert optimised[0] == pytest.approx(plain[0], rel=1e-2)
    assert optimised[1] < optimised[0] - 0.01


def test_cli_train_suite_end_to_end(capsys):
    args = bench.get_args_parser().parse_args(
        ["train", "--device", "cpu", "--steps", "1", "--warmup", "0", "--img-size", "32",
         "-p", "2", "-k", "2", "--threads", "1", "--no-write", "--output", "/nonexistent/B.md"])
    rows = bench.main(args)["train"]
    labels = [row["variant"] for row in rows]
    assert labels[:5] == ["plain", "+bf16", "+channels-last", "+fused", "+checkpointing"]
    assert "+bf16 +channels-last +fused +checkpointing" in labels
    assert sum(row["optimised"] for row in rows) == 1
    for row in rows:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["peak_rss"] > 0
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "optimised = " in printed and ">= 1.5x plain" in printed


def test_profile_of_one_step_names_the_operators_that_take_the_time(capsys):
    argv = bench_train.train_argv(bench.get_args_parser().parse_args(
        ["train", "--device", "cpu", "--img-size", "32", "-p", "2", "-k", "2"]))
    result = bench_train.profile_case(argv, frozenset({"fused"}), 1)
    rows = result["rows"]
    assert 0 < len(rows) <= bench_train.PROFILE_ROWS and result["where"] == "CPU operators"
    assert [r["self_ms"] for r in rows] == sorted((r["self_ms"] for r in rows), reverse=True)
    assert 0 < sum(r["share"] for r in rows) <= 1 + 1e-9
    assert any("conv" in r["name"] or "mm" in r["name"] or "linear" in r["name"] for r in rows)


def test_cli_metrics_suite_appends_a_section(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    args = bench.get_args_parser().parse_args(
        ["metrics", "--device", "cpu", "--sizes", "120", "--big", "150", "--dim", "16",
         "--threads", "1", "--output", str(output)])
    rows = bench.main(args)["metrics"]
    assert rows[0]["max_diff"] <= bench_metrics.EQUAL_TOL and rows[0]["speedup"] > 0
    assert rows[1]["n"] == 150 and rows[1]["fast"]["seconds"] > 0
    text = output.read_text()
    assert text.startswith("# Benchmarks") and "| 120 |" in text and "| 150 |" in text
    bench.main(args)
    assert output.read_text().count("# Benchmarks") == 1  # the header once, sections appended


def test_cli_multilabel_suite_measures_both_paths(tmp_path):
    args = bench.get_args_parser().parse_args(["multilabel", "--device", "cpu", "--sizes", "120", "--big", "0",
                                               "--dim", "16", "--threads", "1", "--output", str(tmp_path / "b.md")])
    (row,) = bench.main(args)["multilabel"]
    assert row["n"] == 120 and min(row["patients_seconds"], row["multilabel_core_seconds"],
                                   row["multilabel_seconds"]) > 0
    assert "multi-label against single-label" in (tmp_path / "b.md").read_text()
    table = bench_metrics.random_findings(1000)
    assert table.any(1).all() and 1.1 < table.sum(1).float().mean() < 1.5


def test_cli_rerank_suite_times_every_method(tmp_path):
    args = bench.get_args_parser().parse_args(["rerank", "--device", "cpu", "--sizes", "120", "--big", "0",
                                               "--dim", "16", "--threads", "1", "--output", str(tmp_path / "b.md")])
    (row,) = bench.main(args)["rerank"]
    assert row["n"] == 120 and min(row[f"{name}_seconds"] for name in
                                   ("patients", "rerank_aqe", "rerank_dba", "rerank_kreciprocal")) > 0
    assert "re-ranking against the plain ranking" in (tmp_path / "b.md").read_text()


class SlowImages(torch.utils.data.Dataset):
    """Two classes of blank images, each taking `delay` seconds to load."""

    def __init__(self, n, delay):
        self.targets, self.delay = torch.arange(n) % 2, delay

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        time.sleep(self.delay)
        return torch.zeros(3, 8, 8), int(self.targets[index])


def test_loader_timing_stops_at_its_budget_and_a_stalled_batch_fails(monkeypatch):
    from argparse import Namespace

    from cxr import bench_data
    args = Namespace(labels_per_batch=2, samples_per_label=2)
    rate, batches = bench_data.loader_rate(SlowImages(8, 0.05), args, 0, 40, 1, False, seconds=0.3)
    assert 1 <= batches < 40 and rate > 0  # about 0.2 s a batch: stopped after a few, not all 40
    monkeypatch.setattr(bench_data, "BATCH_TIMEOUT_S", 1)
    with pytest.raises(RuntimeError, match="timed out"):
        bench_data.loader_rate(SlowImages(8, 3.0), args, 1, 2, 0, False)  # a worker stuck for 12 s a batch
