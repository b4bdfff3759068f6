"""saliency_selection.py: candidates run on the validation split, the winner alone on test."""
import json

import pytest

import saliency_selection
import train
from cxr.errors import UserError
from test_train import ckpt, phantoms, tiny_args  # noqa: F401  (the phantoms fixture)


def fake_row(beyond, gain=0.5):
    return {"gain_beyond": beyond, "gain": gain}


def test_the_highest_gain_beyond_the_randomised_copy_wins_and_ties_go_to_the_earlier_candidate():
    assert saliency_selection.choose({"a": fake_row(0.1), "b": fake_row(0.3), "c": fake_row(0.2)}) == "b"
    assert saliency_selection.choose({"a": fake_row(0.3), "b": fake_row(0.3)}) == "a"
    # the raw gain does not choose: a map as good without the trained weights loses
    assert saliency_selection.choose({"a": fake_row(0.05, gain=0.6), "b": fake_row(0.2, gain=0.3)}) == "b"
    assert saliency_selection.choose({"a": fake_row(None), "b": fake_row(-0.1)}) == "b"


def test_selection_runs_candidates_on_val_and_only_the_winner_on_test(phantoms, tmp_path, monkeypatch):  # noqa: F811
    # half the training list held out, so validation has lesion phantoms of every class to score
    train.main(tiny_args(phantoms, tmp_path / "run", "--epochs", "1", "--img-size", "64", "--val-fraction", "0.5"))
    cheap = ["--faithfulness-steps", "2", "--faithfulness-images", "3"]  # 13 runs: every copy short
    monkeypatch.setattr(saliency_selection, "CANDIDATES", {
        "gradnorm, prototype": ["--method", "gradnorm", "--target", "prototype", *cheap],
        "ig, contrast": ["--method", "ig", "--target", "contrast", "--ig-steps", "2", *cheap]})
    seen = []
    real_run = saliency_selection.run
    monkeypatch.setattr(saliency_selection, "run", lambda args, c, split, name, key=None, sanity="all":
                        seen.append((split, name, sanity)) or real_run(args, c, split, name, key, sanity))
    out = tmp_path / "selection"
    chosen, validation, test = saliency_selection.main(saliency_selection.get_args_parser().parse_args([
        "--resume", str(ckpt(tmp_path / "run", "best")), "--mask-dir", str(phantoms / "masks"),
        "--out", str(out), "--device", "cpu", "--also", str(ckpt(tmp_path / "run", "best"))]))
    # the same checkpoint given twice: two test rows, neither overwriting the other
    assert seen == [("val", "gradnorm, prototype", "all"), ("val", "ig, contrast", "all"),
                    ("test", chosen, "cascade"), ("test", chosen, "all")]
    assert len(test) == 2 and len({r["gain"] for r in test.values()}) == 1
    assert chosen == max(validation, key=lambda n: validation[n]["gain_beyond"])
    for r in validation.values():  # the gain beyond is the raw gain less the randomised copy's, same images
        assert r["gain_beyond"] == pytest.approx(r["gain"] - r["randomised_gain"])
        assert -1 <= r["spearman"] <= 1 and list(r["cascade"]) == ["all"]
    saved = json.loads((out / "selection.json").read_text())
    assert saved["chosen"] == chosen and saved["flags"] == saliency_selection.CANDIDATES[chosen]
    row = test[ckpt(tmp_path / "run", "best").stem]
    assert row["images"] == 15 and -1 <= row["gain"] <= 1
    assert list(row["cascade"]) == ["head", "head+stage4", "head+stages4-3", "head+stages4-2", "head+stages4-1",
                                    "all"]
    assert row["cascade"]["all"]["gain_beyond"] == row["gain_beyond"]
    assert list(next(r for k, r in test.items() if k != ckpt(tmp_path / "run", "best").stem)["cascade"]) == ["all"]
    text = (out / "selection.md").read_text()
    assert f"**{chosen}**" in text and "| gradnorm, prototype |" in text and "pneumonia pointing" in text
    assert "gain beyond randomised [95%]" in text and "Spearman trained vs randomised" in text
    assert "| head+stage4 |" in text and "Test gain beyond the randomised copy:" in text


def test_selection_errors(tmp_path):
    with pytest.raises(UserError, match="--mask-dir"):
        saliency_selection.main(saliency_selection.get_args_parser().parse_args([
            "--resume", str(tmp_path / "x.pth"), "--mask-dir", str(tmp_path / "none"), "--out", str(tmp_path)]))
    (tmp_path / "masks").mkdir()
    with pytest.raises(UserError, match="no such checkpoint"):
        saliency_selection.main(saliency_selection.get_args_parser().parse_args([
            "--resume", str(tmp_path / "x.pth"), "--mask-dir", str(tmp_path / "masks"), "--out", str(tmp_path)]))
