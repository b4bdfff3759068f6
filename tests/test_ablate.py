"""ablate.py's bookkeeping: which runs are finished, what the table reports, stale evaluations."""
import json

import ablate


def fake_run(out, variant, seed, test_map, vit_share=None, difference=None):
    directory = ablate.run_dir(out, variant, seed)
    directory.mkdir(parents=True)
    (directory / "args.json").write_text(json.dumps({"epochs": 2}))
    records = [{"epoch": 0, "test_mAP": 20.0},
               {"epoch": 1, "val_R@1": 50, "val_mAP": 40, "test_R@1": 60, "test_mAP": 50, "train_time_s": 10,
                "time_s": 12, "best_epoch": 1},
               {"epoch": 2, "val_R@1": 70, "val_mAP": 60, "test_R@1": 80, "test_mAP": test_map, "train_time_s": 20,
                "time_s": 22, "best_epoch": 2}]
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = {"branch_attribution": {"convnext": 100 - vit_share, "vit": vit_share} if vit_share else None,
              "files": {"embeddings": str(directory / "e.npz")}}
    (directory / "test_report.json").write_text(json.dumps(report))
    if difference is not None:
        comparison = {"comparison": {"map": {"difference": difference, "low": difference - 1, "high": difference + 1}}}
        (directory / f"compare_vs_{ablate.REFERENCES['models']}_seed_{seed}.json").write_text(json.dumps(comparison))
    return directory


def test_model_table_reads_the_best_epoch_shares_and_paired_differences(tmp_path):
    for seed, (ref, hybrid) in enumerate(((70.0, 72.0), (74.0, 75.0))):
        fake_run(tmp_path, "convnext", seed, ref)
        fake_run(tmp_path, "hybrid", seed, hybrid, vit_share=40.0 + seed * 10, difference=hybrid - ref)
    unfinished = ablate.run_dir(tmp_path, "vit", 0)
    unfinished.mkdir()
    (unfinished / "args.json").write_text(json.dumps({"epochs": 8}))
    (unfinished / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_mAP": 20.0}) + "\n")
    assert ablate.result_of(unfinished) is None
    text, points = ablate.summarise(tmp_path, "models", ["convnext", "vit", "hybrid"], [0, 1])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    hybrid = rows[ablate.MODEL_VARIANTS["hybrid"][1]]
    assert "73.5 ± 2.1" in hybrid  # test mAP of the best epochs 72 and 75
    assert "45.0 ± 7.1" in hybrid  # ViT share 40 and 50
    assert "+2.0 [+1.0, +3.0]; +1.0 [+0.0, +2.0]" in hybrid
    assert ablate.MODEL_VARIANTS["vit"][1] not in rows  # no finished run
    assert points[ablate.MODEL_VARIANTS["convnext"][1]] == [70.0, 74.0]


def test_retraining_the_reference_forgets_every_comparison_against_it(tmp_path):
    fake_run(tmp_path, "convnext", 0, 70.0)
    hybrid = fake_run(tmp_path, "hybrid", 0, 72.0, difference=2.0)
    ablate.forget_evaluations(tmp_path, "convnext", 0)
    assert not (hybrid / f"compare_vs_{ablate.REFERENCES['models']}_seed_0.json").exists()
    assert not (ablate.run_dir(tmp_path, "convnext", 0) / "test_report.json").exists()
    assert (hybrid / "test_report.json").exists()


def test_rerank_table_pairs_every_seed_with_the_plain_ranking(tmp_path, monkeypatch):
    monkeypatch.setitem(ablate.RERANK_RUNS, "digits", (str(tmp_path), "default"))
    for seed in (0, 1):
        directory = fake_run(tmp_path, "default", seed, 70.0)
        for method in ablate.RERANK_METHODS:
            entry = {"a": 71.0, "b": 70.0 + seed, "difference": 1.0 - seed, "low": -0.5, "high": 2.5 - seed}
            rerank = {"method": method, "k": 5, "vs_plain": {"map": entry, "recall_at_k": {"1": entry},
                                                            "map_at_r": entry}}
            (directory / f"rerank_{method}.json").write_text(json.dumps({"rerank": rerank}))
    text = ablate.rerank_table("digits", [0, 1, 2])
    rows = text.splitlines()[2:]
    assert len(rows) == len(ablate.RERANK_METHODS) and rows[0].startswith("| aqe (k 5) | 2 | 70.5 ± 0.7 |")
    assert "+1.0 [-0.5, +2.5]; +0.0 [-0.5, +1.5]" in rows[1]
