"""train.py --tensorboard: event files with every epoch's metrics.jsonl numbers, the per-step
loss and learning rate, and the validation embeddings in the projector; a clear message without
the package."""
import builtins

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from cxr.errors import UserError
from test_train import phantoms, read_metrics, tiny_args  # noqa: F401  (the phantoms fixture)


def test_event_files_hold_the_epochs_numbers_the_steps_and_the_projector(phantoms, tmp_path):
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "2", "--tensorboard", "--print-freq", "1"))
    board = tmp_path / "tensorboard"
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = events.Tags()["scalars"]
    records = read_metrics(tmp_path)
    val_map = [(e.step, e.value) for e in events.Scalars("val_mAP")]
    assert val_map == [(r["epoch"], pytest.approx(r["val_mAP"], rel=1e-6)) for r in records]
    for key in ("train_loss", "test_mAP", "active_triplets", "images_per_s"):
        assert key in scalars, key
    steps = [e.step for e in events.Scalars("step/loss")]
    assert steps == [1, 2, 3, 4] and "step/lr" in scalars  # 2 batches per epoch, logged every step
    projector = board / "projector_config.pbtxt"
    assert projector.is_file()
    best = records[-1]["best_epoch"]
    folder = board / f"{best:05d}" / "validation"
    labels = (folder / "metadata.tsv").read_text().splitlines()
    assert len(labels) >= 10 and set(labels) <= {"COVID-19", "cardiomegaly", "effusion", "normal", "pneumonia"}
    assert (folder / "sprite.png").is_file() and (folder / "tensors.tsv").is_file()


def test_without_the_package_the_run_stops_with_the_install_command(phantoms, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match="pip install tensorboard"):
        train.main(tiny_args(phantoms, tmp_path, "--epochs", "1", "--tensorboard", str(tmp_path / "tb")))
    assert not (tmp_path / "metrics.jsonl").exists()  # stopped before any training
