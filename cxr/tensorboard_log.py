"""train.py --tensorboard: the run as TensorBoard shows it. Every number of metrics.jsonl per
epoch (val_*, test_*, train_*), the running loss and the learning rate at every logged step
(--print-freq), and at each new best epoch the validation embeddings in the projector with a
thumbnail and the label of each image. Only the main process writes.

TensorBoard is optional: without the package, --tensorboard stops at once with the command that
installs it (no run is started that would then have no log).
"""
import numbers

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
    def __init__(self, folder, runtime):
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

    def projector(self, embeddings, labels, dataset, classes, epoch):
        """The validation embeddings with their labels and thumbnails (the first PROJECTOR_IMAGES)."""
        if self.writer is None:
            return
        n = min(len(embeddings), PROJECTOR_IMAGES)
        images = torch.stack([dataset[i][0] for i in range(n)])  # normalised, as the model saw them
        low, high = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
        thumbnails = F.interpolate((images - low) / (high - low).clamp(min=1e-6), size=THUMBNAIL,
                                   mode="bilinear", align_corners=False)
        self.writer.add_embedding(embeddings[:n].cpu(), metadata=[classes[int(t)] for t in labels[:n]],
                                  label_img=thumbnails, global_step=epoch, tag="validation")
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
