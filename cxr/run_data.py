"""A run's data sets, built one way for every program.

train.py builds its training, validation and test sets from its flags with build_datasets;
test.py, ood.py and explain.py rebuild them from the arguments a checkpoint records
(recorded_run, training_splits), so the validation split ood.py calibrates on is the one
training held out, image for image, and a checkpoint alone says where its data lies.
"""
import argparse
import tempfile
from pathlib import Path

from cxr import demo_dataset, faults
from cxr.image_cache import ImageCache
from cxr.presets import DEMO_DATA, LIST_FORMAT, split_folder
from cxr.runtime import barrier
from dataset import ImageListDataset, build_transform, split_by_patient

# The folder flags as train.py means them, named in the errors of a list that does not fit.
DATASET_DIR_FLAG = "--dataset-dir (train.py reads images from <dataset-dir>/train and <dataset-dir>/test)"


def build_datasets(args, runtime, folder_flag=DATASET_DIR_FLAG):
    """(train, validation or None, test) datasets; validation from --val-image-list or a
    patient-grouped --val-fraction of the training list. With --cache-dir every split reads
    through the pre-resized image cache (image_cache.py)."""
    if args.dataset == "demo":
        if runtime.is_main:
            demo_dataset.ensure_demo_dataset(args.dataset_dir, **DEMO_DATA)
        barrier(runtime)  # the other ranks wait for rank 0 to write the phantoms
    list_format = LIST_FORMAT[args.dataset]
    train_transform = build_transform(args.img_size, True, args.rand_resize, args.hflip)
    eval_transform = build_transform(args.img_size, False)
    bit_depth = "auto" if args.bit_depth == "auto" else int(args.bit_depth)
    train_set = ImageListDataset(split_folder(args.dataset, args.dataset_dir, "train"), args.train_image_list,
                                 list_format, transform=train_transform, bit_depth=bit_depth,
                                 folder_flag=folder_flag, list_options=list_options(args, "train"))
    classes, multilabel = train_set.classes, train_set.multilabel
    bit_depth = train_set.bit_depth or bit_depth  # the training set's depth for every split
    val_set = None
    if separate_validation(vars(args)):
        val_format = LIST_FORMAT[getattr(args, "val_dataset", None) or args.dataset]
        val_set = ImageListDataset(args.val_dataset_dir, args.val_image_list, val_format,
                                   classes=classes, transform=eval_transform, bit_depth=bit_depth,
                                   folder_flag="--val-dataset-dir (the validation images' folder)",
                                   multilabel=multilabel, list_options=list_options(args, "val"))
    test_set = ImageListDataset(split_folder(args.dataset, args.dataset_dir, "test"), args.test_image_list,
                                list_format, classes=classes, transform=eval_transform, bit_depth=bit_depth,
                                folder_flag=folder_flag, multilabel=multilabel,
                                list_options=list_options(args, "test"))
    faults.check_images([s for s in (train_set, val_set, test_set) if s is not None], args, runtime)
    use_cache([train_set, val_set, test_set], getattr(args, "cache_dir", None), args.img_size)
    if val_set is None and args.val_fraction > 0:
        train_idx, val_idx = split_by_patient(train_set, args.val_fraction, args.seed)
        val_set = train_set.subset(val_idx, eval_transform)
        train_set = train_set.subset(train_idx, train_transform)
    return train_set, val_set, test_set


# The split of MIMIC-CXR-JPG's split file each of a run's lists reads.
MIMIC_SPLIT_OF = {"train": "train", "val": "validate", "test": "test"}


def list_options(args, role):
    """The public formats' reading options of the list playing `role` ("train", "val" or
    "test"); a namespace or a recorded run's dict (older runs: the defaults)."""
    get = args.get if isinstance(args, dict) else lambda key: getattr(args, key, None)
    return {"views": get("views") or "frontal", "uncertain": get("uncertain") or "zeros",
            "label_file": get("label_file"), "metadata_file": get("metadata_file"),
            "split": MIMIC_SPLIT_OF[role]}


def given_list_options(args, run, role):
    """The reading options of a list a program (test.py, explain.py, ood.py, retrieve.py) reads:
    each flag given (--views, --uncertain, --label-file, --metadata-file, --mimic-split), else
    the recorded run's (its label files only when it read the same data set), else the defaults."""
    options = list_options(run or {}, role)
    dataset = getattr(args, "dataset", None)
    if dataset and (run or {}).get("dataset") != dataset:  # another data set's label files do not apply
        options.update(label_file=None, metadata_file=None)
    for key in ("views", "uncertain", "label_file", "metadata_file"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    if getattr(args, "mimic_split", None):
        options["split"] = args.mimic_split
    return options


def separate_validation(run):
    """Whether the run (train.py's arguments as a dict) validates on data of its own rather than
    a --val-fraction of the training list: a --val-image-list, or for a folder layout a
    --val-dataset-dir other than the training folder (older runs recorded that as the default)."""
    if run.get("val_image_list"):
        return True
    folder = LIST_FORMAT[run.get("val_dataset") or run["dataset"]] == "folder"
    own_dir = run.get("val_dataset_dir")
    return bool(folder and own_dir and Path(own_dir) != Path(run.get("dataset_dir") or ".") / "train")


def use_cache(datasets, cache_dir, img_size):
    """Every dataset of `datasets` (None entries skipped) reads through one ImageCache in
    cache_dir (nothing happens without one)."""
    if not cache_dir:
        return None
    cache = ImageCache(cache_dir, img_size)
    for dataset in datasets:
        if dataset is not None:
            dataset.use_cache(cache)
    return cache


def recorded_run(checkpoint, dataset_dir=None):
    """The training run's arguments a checkpoint records ({} when it records none), with every
    path under its --dataset-dir moved to `dataset_dir` when the data was copied elsewhere."""
    run = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if not isinstance(run, dict) or run.get("dataset") not in LIST_FORMAT:
        return {}
    return relocate(run, dataset_dir)


def relocate(train_args, dataset_dir):
    """The run's arguments with every path under its --dataset-dir moved to `dataset_dir`
    (the data was copied elsewhere since training)."""
    old = train_args.get("dataset_dir")
    if not (dataset_dir and old) or Path(dataset_dir) == Path(old):
        return dict(train_args)
    moved = dict(train_args, dataset_dir=str(dataset_dir))
    for key in ("train_image_list", "test_image_list", "val_image_list", "val_dataset_dir"):
        value = train_args.get(key)
        if value and Path(value).is_relative_to(old):
            moved[key] = str(Path(dataset_dir) / Path(value).relative_to(old))
    return moved


def training_splits(train_args, runtime, dataset, dataset_dir, bit_depth=None, cache_dir=None,
                    folder_flag=DATASET_DIR_FLAG):
    """The checkpoint's own (training, validation or None) images, as train.py split them;
    `dataset`/`dataset_dir` stand in for the run's when the data has moved; `folder_flag`: what
    the calling program's errors tell the user to check (see ImageListDataset)."""
    # Flags added since an older checkpoint was saved get their defaults; the run's bad images
    # are dropped as in training, but their list goes to a scratch folder, not the run's.
    run_args = argparse.Namespace(**{"bit_depth": "auto", "skip_bad_images": False, **train_args,
                                     "dataset": dataset, "dataset_dir": str(dataset_dir),
                                     "cache_dir": cache_dir,
                                     "save_dir": tempfile.mkdtemp(prefix="run_data_")})
    if bit_depth:  # the depth training scaled by, not a new scan
        run_args.bit_depth = str(bit_depth)
    train_set, val_set, _ = build_datasets(run_args, runtime, folder_flag)
    return train_set, val_set
