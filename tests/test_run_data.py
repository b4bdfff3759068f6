"""run_data.py: a run's data sets, each list in its own format."""
import torch

from cxr import run_data, train_args
from cxr.runtime import Runtime
from test_train import phantoms, tiny_args  # noqa: F401  (the phantoms fixture)


def test_a_validation_list_in_another_format_than_the_training_list(phantoms, tmp_path):
    rows = [line.split() for line in (phantoms / "train_split.txt").read_text().splitlines()[:10]]
    csv_list = tmp_path / "val.csv"
    csv_list.write_text("filename,label,patient_id\n" + "".join(f"{r[1]},{r[2]},{r[0]}\n" for r in rows))
    args = tiny_args(phantoms, tmp_path / "run", "--val-image-list", str(csv_list), "--val-dataset", "csv",
                     "--allow-patient-overlap")
    train_set, val_set, test_set = run_data.build_datasets(args, Runtime(torch.device("cpu")))
    assert len(val_set) == 10 and str(val_set.source) == str(csv_list) and val_set.classes == train_set.classes
    assert [str(p.name) for p in val_set.paths] == [r[1] for r in rows]


def test_a_list_given_for_a_folder_layout_is_an_error_not_ignored(phantoms, tmp_path):
    import pytest
    with pytest.raises(SystemExit, match="folder-layout validation set is read from --val-dataset-dir"):
        train_args.parse_args(["--dataset", "folder", "--setup", "small", "--val-image-list", "no_such.txt"])
    with pytest.raises(SystemExit, match="no list files"):
        train_args.parse_args(["--dataset", "folder", "--setup", "small", "--train-image-list", "x.txt"])


def test_separate_validation_follows_the_recorded_run():
    assert run_data.separate_validation({"dataset": "covid", "val_image_list": "v.txt"})
    assert not run_data.separate_validation({"dataset": "covid", "val_image_list": None,
                                             "val_dataset_dir": "data/train", "dataset_dir": "data"})
    # a folder run: its own validation folder counts, the training folder (old default) does not
    assert run_data.separate_validation({"dataset": "folder", "val_dataset_dir": "own/val", "dataset_dir": "data"})
    assert not run_data.separate_validation({"dataset": "folder", "val_dataset_dir": "data/train",
                                             "dataset_dir": "data"})


def test_test_py_reads_a_validation_list_in_its_own_format(phantoms, tmp_path):
    import train
    from test_eval_inputs import run_test_py
    from test_train import ckpt
    rows = [line.split() for line in (phantoms / "train_split.txt").read_text().splitlines()[:10]]
    csv_list = tmp_path / "val.csv"
    csv_list.write_text("filename,label,patient_id\n" + "".join(f"{r[1]},{r[2]},{r[0]}\n" for r in rows))
    train.main(tiny_args(phantoms, tmp_path / "run", "--epochs", "1", "--val-image-list", str(csv_list),
                         "--val-dataset", "csv", "--allow-patient-overlap"))
    report = run_test_py("--resume", ckpt(tmp_path / "run", "best"), "--no-plots", "--allow-patient-overlap",
                         "--report", tmp_path / "r.json")
    assert report["lists"]["validation"]["images"] == 10  # read as CSV, as in training
