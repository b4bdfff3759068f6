"""run_data.py: a run's data sets, each list in its own format."""
import torch

import run_data
import utils
from test_train import phantoms, tiny_args  # noqa: F401  (the phantoms fixture)


def test_a_validation_list_in_another_format_than_the_training_list(phantoms, tmp_path):
    rows = [line.split() for line in (phantoms / "train_split.txt").read_text().splitlines()[:10]]
    csv_list = tmp_path / "val.csv"
    csv_list.write_text("filename,label,patient_id\n" + "".join(f"{r[1]},{r[2]},{r[0]}\n" for r in rows))
    args = tiny_args(phantoms, tmp_path / "run", "--val-image-list", str(csv_list), "--val-dataset", "csv",
                     "--allow-patient-overlap")
    train_set, val_set, test_set = run_data.build_datasets(args, utils.Runtime(torch.device("cpu")))
    assert len(val_set) == 10 and str(val_set.source) == str(csv_list) and val_set.classes == train_set.classes
    assert [str(p.name) for p in val_set.paths] == [r[1] for r in rows]
