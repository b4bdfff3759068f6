"""What explain.py explains, and against what: with --split, the checkpoint's own validation or
test images with the gallery and the location-prior list that go with them; the reference class
and its mean image (where integrated gradients start); the location prior fitted on lesion masks
of a list that is never the reported one; the lesion masks read back for the mismatched baseline;
and the checks of explain.py's flags against each other.
"""
import argparse
from pathlib import Path

import torch
from PIL import Image

from cxr import localisation, regions, run_data
from cxr import masks as mask_sources
from cxr.errors import UserError
from cxr.gradcam import METHODS
from cxr.presets import split_folder
from cxr.public_lists import NO_FINDING
from dataset import ImageListDataset

REFERENCE_IMAGES = 500  # gallery images averaged into the integrated-gradients reference image


def split_sets(args, run, runtime, classes, list_format, bit_depth):
    """With --split: (images explained, images the location prior is fitted on, gallery or None)
    from the checkpoint's own run. val: the validation images training held out, the prior and
    the gallery from the rest of the training list (the explained images are in neither); test:
    the run's test list, the prior from the training list less validation, the gallery as
    without --split. Without --split: (None, None, None)."""
    if not args.split:
        return None, None, None
    if not run.get("dataset_dir"):
        raise UserError(f"--split: {args.resume} does not record its run's data; give --image-list "
                              "and --dataset-dir instead")
    recorded = (f"the checkpoint's recorded dataset_dir {run['dataset_dir']} (explain.py --split reads the run's "
                "own lists there; where the data has moved, explain an --image-list with its --dataset-dir)")
    train_part, val_part = run_data.training_splits(run, runtime, run["dataset"], run["dataset_dir"], bit_depth,
                                                    folder_flag=recorded)
    if args.split == "val":
        if val_part is None:
            raise UserError(f"--split val: the run of {args.resume} held out no validation images "
                                  "(--val-fraction 0); explain --split test or an --image-list")
        gallery = None if args.gallery_image_list else train_part  # another gallery: see check_gallery
        return val_part, train_part, gallery
    test = ImageListDataset(split_folder(run["dataset"], run["dataset_dir"], "test"), run["test_image_list"],
                            list_format, classes, bit_depth=bit_depth or "auto", folder_flag=recorded,
                            multilabel=train_part.multilabel, list_options=run_data.list_options(run, "test"))
    return test, train_part, None


def shared_images(paths, others):
    """The files (resolved paths) in both lists: the same image listed under two names counts."""
    return {Path(p).resolve() for p in paths} & {Path(p).resolve() for p in others}


def check_gallery(args, gallery, explained):
    """--split val with a gallery of the user's (--gallery-image-list) must not hold the validation
    images: each would be its own first neighbour and pull its class's prototype."""
    if args.split != "val":
        return
    shared = shared_images(gallery.paths, explained.paths)
    if shared:
        raise UserError(f"--gallery-image-list shares {len(shared)} images with the validation images "
                              f"explained (e.g. {sorted(shared)[0]}); leave it out (the gallery is then the "
                              "training list less validation) or give a list without them")


def reference_class(args, classes):
    """The class the contrast target and the IG reference image are taken from: --reference-class,
    else "normal" or "No Finding" (NIH, CheXpert, MIMIC-CXR) when the checkpoint has it, else None
    (--target contrast falls back to the
    prototype, the IG reference to the mean image of the whole gallery, with a note)."""
    if args.reference_class:
        if args.reference_class not in classes:
            raise UserError(f"--reference-class {args.reference_class}: not a class of this checkpoint "
                                  f"({', '.join(classes)})")
        return args.reference_class
    for normal in ("normal", NO_FINDING):
        if normal in classes:
            return normal
    starts_from_reference = METHODS[args.method].needs_reference
    if starts_from_reference or args.target == "contrast":
        print(f"note: no 'normal' or '{NO_FINDING}' class among {', '.join(classes)} and no --reference-class "
              "(give one to choose): " + "; ".join(part for part, used in (
                  ("--target contrast falls back to the predicted class's prototype", args.target == "contrast"),
                  (f"{METHODS[args.method].title} start from the mean gallery image", starts_from_reference)) if used))
    return None


@torch.inference_mode()
def reference_image(gallery, class_index, limit=REFERENCE_IMAGES):
    """The mean transformed image (3, H, W) of up to `limit` gallery images of `class_index`
    (evenly spaced in list order), or of the whole gallery when class_index is None: the
    reference integrated gradients start from (what a normal radiograph looks like here)."""
    indices = torch.arange(len(gallery)) if class_index is None else \
        (gallery.targets == class_index).nonzero()[:, 0]
    if len(indices) == 0:
        name = "any class" if class_index is None else f"class '{gallery.classes[class_index]}'"
        raise UserError(f"the gallery holds no image of {name} to make the integrated-gradients "
                              "reference image from; give --reference-class a class the gallery has, or "
                              "a gallery (--gallery-image-list) with images of it")
    if len(indices) > limit:
        indices = indices[torch.linspace(0, len(indices) - 1, limit).round().long()]
    total = None
    for i in indices.tolist():
        image = gallery[i][0].float()
        total = image if total is None else total + image
    return total / len(indices)


def fit_location_prior(args, ctx, reporting_paths):
    """The location prior (localisation.fit_prior) from the lesion masks of --prior-image-list,
    or with --split and --mask-dir of the run's training images less validation; None
    otherwise. Refuses a fitting list that shares an image with the reported ones: a prior
    fitted on the images it is compared on would flatter the baseline."""
    if args.prior_image_list:
        fitting = ImageListDataset(args.prior_dataset_dir, args.prior_image_list, ctx["list_format"],
                                   ctx["classes"], bit_depth=None)  # only masks and sizes are read
        fitted_on, flag = str(args.prior_image_list), "--prior-image-list"
    elif ctx["fitting"] is not None and args.mask_dir and (Path(args.mask_dir) / "lesion").is_dir():
        fitting, fitted_on, flag = ctx["fitting"], "the run's training images less validation", "the fitting list"
    else:
        return None  # no fitting list, or no lesion masks (lungs and heart only): no prior point
    shared = shared_images(fitting.paths, reporting_paths)
    if shared:
        raise UserError(f"{flag} shares {len(shared)} images with the images explained "
                              f"(e.g. {sorted(shared)[0]}); fit the prior on other images, e.g. the "
                              "training or validation list")
    names = [str(p.relative_to(fitting.image_root)) for p in fitting.paths]
    # --lung-mask/--heart-mask belong to the one --image, not to the fitting images
    reader = mask_sources.MaskReader(argparse.Namespace(**{**vars(args), "lung_mask": None, "heart_mask": None}), names)

    def samples():
        for name, path, target in zip(names, fitting.paths, fitting.targets.tolist()):
            masks = reader.source(name) or {}
            if callable(masks):  # CheXmask rows decode at the image's size
                with Image.open(path) as image:
                    masks = masks((image.height, image.width))
            yield ctx["classes"][target], masks.get("lesion"), masks.get("lungs"), masks.get("sides")

    prior = localisation.fit_prior(samples(), ctx["tolerances"])
    if not prior["num_images"]:
        raise UserError(f"no image of {fitted_on} has a lesion mask under {Path(args.mask_dir) / 'lesion'}")
    prior["fitted_on"] = fitted_on
    return prior


def read_lesion(mask_dir, name, size):
    """The lesion mask of the image listed as `name`, at `size` (H, W)."""
    return regions.load_mask(mask_sources.mask_file(mask_dir, "lesion", name), size)


def check_flags(args):
    """Every contradiction of the flags, before any model is loaded."""
    if args.neighbour_rank < 1 or args.neighbour_rank > args.topk:
        raise UserError(f"--neighbour-rank {args.neighbour_rank} must be between 1 and --topk {args.topk}")
    if sum(map(bool, (args.image, args.image_list, args.split))) != 1:
        raise UserError("give one of --image (one radiograph), --image-list with --dataset-dir, or "
                              "--split val|test (the checkpoint's own validation or test images)")
    if args.image_list and not args.dataset_dir:
        raise UserError("--image-list needs --dataset-dir, the folder its paths are relative to")
    if args.image and not Path(args.image).is_file():
        raise UserError(f"--image {args.image}: no such file")
    for flag, path in (("--lung-mask", args.lung_mask), ("--heart-mask", args.heart_mask),
                       ("--mask-dir", args.mask_dir), *(("--chexmask", c) for c in args.chexmask)):
        if path and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file or folder")
    if not args.image and (args.lung_mask or args.heart_mask):
        raise UserError("--lung-mask and --heart-mask are the masks of one --image; for a list "
                              "give --mask-dir or --chexmask")
    if args.chexmask and (args.lung_mask or args.heart_mask):
        raise UserError("give the lung and heart masks either as PNGs (--lung-mask, --heart-mask) "
                              "or as --chexmask rows, not both")
    if args.sanity != "none" and args.image:
        raise UserError(f"--sanity {args.sanity} compares the maps of a list with those of randomised copies; "
                        "give --image-list or --split, or drop --sanity for one --image")
    if args.road and (args.faithfulness_steps < 1 or args.faithfulness_images < 1 and not args.image):
        raise UserError("--road draws its curves beside deletion/insertion: it needs --faithfulness-steps "
                        "and (batch mode) --faithfulness-images above 0")
    if args.ig_steps < 1:
        raise UserError(f"--ig-steps {args.ig_steps}: give at least 1 integration step (8 by default)")
    if args.smooth < 0:
        raise UserError(f"--smooth {args.smooth}: a Gaussian sigma in input pixels, >= 0 (0: no smoothing)")
    if args.split and (args.dataset_dir or args.gallery_dataset_dir and not args.gallery_image_list):
        raise UserError("--split explains the checkpoint's recorded data: --dataset-dir goes with "
                              "--image-list, --gallery-dataset-dir with --gallery-image-list")
    if not 0.0 <= args.min_mask_dice <= 1.0:
        raise UserError(f"--min-mask-dice {args.min_mask_dice} is a Dice coefficient between 0 and 1")
    if args.chexmask_id_column and not args.chexmask:
        raise UserError("--chexmask-id-column names a column of the --chexmask CSVs; give --chexmask")
    if not 0.0 < args.pointing_tolerance < 1.0:
        raise UserError(f"--pointing-tolerance {args.pointing_tolerance} is a fraction of the image "
                              "width between 0 and 1 (0.05: 5%)")
    if bool(args.prior_image_list) != bool(args.prior_dataset_dir):
        raise UserError("--prior-image-list and --prior-dataset-dir go together (the fitting list "
                              "and the folder its paths are relative to)")
    if args.prior_image_list and not args.mask_dir:
        raise UserError("--prior-image-list fits the location prior on lesion masks; give --mask-dir "
                              "(its lesion/ folder holds them)")
