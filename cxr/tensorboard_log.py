"""train.py --tensorboard: the run as TensorBoard shows it. Every number of metrics.jsonl per
epoch (val_*, test_*, train_*), the running loss and the learning rate at every logged step
(--print-freq), and at each new best epoch the selection split's embeddings in the projector
with a thumbnail and the label of each image. Only the main process writes; a new run in the same
folder (--overwrite) removes the old run's event files first.

TensorBoard is optional: without the package, --tensorboard stops at once with the command that
installs it (no run is started that would then have no log).
"""
import numbers
from pathlib import Path

import torch
import torch.nn.functional as F

from cxr.errors import UserError

THUMBNAIL = 32  # pixels of a projector thumbnail
PROJECTOR_IMAGES = 500  # at most this many validation images in the projector


def summary_writer(folder):
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports the optional tensorboard package
    except ImportError as error:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or drop --tensorboard; metrics.jsonl holds the same numbers)") from error
    return SummaryWriter(str(folder))


class TensorBoardLog:
    def __init__(self, folder, runtime, fresh=False):
        """fresh: a new run in a folder a run used before (--overwrite): its event files go first."""
        folder = Path(folder)
        if runtime.is_main and fresh and folder.is_dir():
            for old in folder.rglob("events.out.tfevents.*"):
                old.unlink()
        self.writer = summary_writer(folder) if runtime.is_main else None
        self.folder = folder

    def epoch(self, record):
        """Every number of an epoch's metrics record, at the epoch."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "epoch" and isinstance(value, numbers.Number) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def step(self, global_step, values):
        """The running values of a logged training step (loss, lr), at the global step."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"step/{key}", value, global_step)

    def projector(self, embeddings, labels, dataset, classes, epoch, split):
        """The `split` embeddings with their labels and thumbnails: PROJECTOR_IMAGES of them at most,
        evenly spaced over the list (a list sorted by class gives every class)."""
        if self.writer is None:
            return
        picked = torch.linspace(0, len(embeddings) - 1, min(len(embeddings), PROJECTOR_IMAGES)).round().long().unique()
        thumbnails = []
        for index in picked.tolist():  # one film at a time: never a batch of full-size tensors
            image = dataset[index][0][None]  # normalised, as the model saw it
            low, high = image.amin(), image.amax()
            thumbnails.append(F.interpolate((image - low) / (high - low).clamp(min=1e-6), size=THUMBNAIL,
                                            mode="bilinear", align_corners=False)[0])
        self.writer.add_embedding(embeddings[picked].cpu(), metadata=[classes[int(labels[i])] for i in picked],
                                  label_img=torch.stack(thumbnails), global_step=epoch,
                                  tag="validation" if split == "val" else split)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
