"""test.py's lists: the query (test) and gallery lists read with the flags or the checkpoint's
recorded run, and checked before anything is embedded (vote sizes, leakage against the
checkpoint's training lists).

    inputs, query_set, gallery_set = load_lists(args, runtime, checkpoint, model_config)
    checked, trained_on, leakage, vote_ks = check_lists(args, runtime, checkpoint, inputs, query_set, gallery_set)
"""
from pathlib import Path

from cxr import report_inputs, run_data, splits
from cxr.errors import UserError
from cxr.presets import LIST_FORMAT, split_folder
from cxr.runtime import log
from dataset import ImageListDataset, build_transform


def load_lists(args, runtime, checkpoint, config):
    """(inputs, query set, gallery set or None): each data input from its flag, else the
    checkpoint's recorded run, else the defaults (inputs says which)."""
    inputs = report_inputs.resolve_inputs(args, checkpoint)
    log(runtime, report_inputs.describe(inputs))
    args.dataset = inputs["dataset"]["value"]
    test_dir, test_list = inputs["test_dataset_dir"]["value"], inputs["test_image_list"]["value"]
    bit_depth = inputs["bit_depth"]["value"]  # 16-bit files scaled as in training
    classes = checkpoint.get("classes") if isinstance(checkpoint.get("classes"), list) else None
    transform = build_transform(config["img_size"], train=False)
    list_format = LIST_FORMAT[args.dataset]
    options = run_data.given_list_options(args, run_data.recorded_run(checkpoint), "test")
    trained_findings = checkpoint.get("findings")
    query_set = ImageListDataset(test_dir, test_list, list_format, classes, transform, bit_depth=bit_depth,
                                 folder_flag="--test-dataset-dir (the test images' folder; default: the "
                                 "checkpoint's <dataset-dir>/test)", multilabel=trained_findings is not None,
                                 list_options=options)
    gallery_set = None
    if args.gallery_image_list or args.gallery_dataset_dir:
        gallery_format = LIST_FORMAT[args.gallery_dataset or args.dataset]
        if gallery_format == "folder" and args.gallery_image_list:  # it would be silently ignored
            raise SystemExit("error: a folder-layout gallery is read from --gallery-dataset-dir "
                             "(<dir>/<label>/ images), no list; drop --gallery-image-list, or give "
                             "the list's format with --gallery-dataset")
        if not (args.gallery_image_list or gallery_format == "folder") or not args.gallery_dataset_dir:
            raise SystemExit("error: the query-gallery protocol needs --gallery-dataset-dir and "
                             "--gallery-image-list (only the folder for --dataset folder)")
        gallery_set = ImageListDataset(args.gallery_dataset_dir, args.gallery_image_list,
                                       gallery_format, query_set.classes, transform,
                                       bit_depth=query_set.bit_depth or bit_depth,  # one depth for both
                                       folder_flag="--gallery-dataset-dir (the gallery images' folder)",
                                       multilabel=query_set.multilabel,
                                       list_options=gallery_list_options(options, gallery_format, list_format))
        if gallery_set.multilabel and not query_set.multilabel:
            raise UserError(f"the gallery list {args.gallery_image_list} is multi-label but the test list is not; "
                            "give both lists with their findings")
        if query_set.multilabel:  # the gallery's classes extend the queries': one id space for both
            query_set.classes = gallery_set.classes
            mine, theirs = set(query_set.findings), set(gallery_set.findings)
            only = [mine - theirs, theirs - mine]
            if any(only):
                log(runtime, "note: findings of only the test list: " + (", ".join(sorted(only[0])) or "none")
                             + "; of only the gallery: " + (", ".join(sorted(only[1])) or "none")
                             + " (films carrying only these have no relevant film on the other side)")
    run_data.use_cache([query_set, gallery_set], args.cache_dir, config["img_size"])
    if query_set.multilabel:
        trained = trained_findings if trained_findings is not None else classes
        listed = lists_findings(query_set, gallery_set)
        if trained is not None and set(trained) != set(listed):
            log(runtime, f"note: the findings of the lists ({', '.join(listed)}) differ from the checkpoint's "
                         f"training findings ({', '.join(trained)}); retrieval is scored with the lists' own "
                         "labels")
    return inputs, query_set, gallery_set


def gallery_list_options(options, gallery_format, test_format):
    """The gallery list's reading options: the test list's, its MIMIC split "train", and the label
    files beside the gallery list when it is of another format."""
    options = {**options, "split": "train"}
    if gallery_format != test_format:
        options.update(label_file=None, metadata_file=None)
    return options


def lists_findings(query_set, gallery_set):
    """The findings of the query and gallery lists together, sorted: the columns of their tables."""
    return sorted(set(query_set.findings) | set(gallery_set.findings if gallery_set is not None else []))


def check_lists(args, runtime, checkpoint, inputs, query_set, gallery_set):
    """Before embedding: the vote sizes the lists allow, and leakage between the test list, the
    gallery and the checkpoint's training lists. Returns (checked splits, training splits,
    leakage record, vote ks)."""
    def note(message):
        log(runtime, message)

    # A small list holds fewer neighbours per query than the default vote sizes ask for.
    available = report_inputs.neighbours_available(
        query_set.patients, None if gallery_set is None else gallery_set.patients,
        exclude_same_patient=not args.keep_same_patient)
    vote_ks, left_out = report_inputs.choose_vote_ks(args.vote_ks, available, note)
    args.vote_k = report_inputs.choose_vote_k(args.vote_k, vote_ks)
    inputs["vote_ks"] = {"value": list(vote_ks), "from": "flag" if args.vote_ks else "default",
                         "left_out": left_out}
    checked = [splits.Split.from_dataset("test", query_set)]
    if gallery_set is not None:
        checked.append(splits.Split.from_dataset("gallery", gallery_set))
    trained_on, notes = training_splits(checkpoint, note)
    leakage = splits.check_splits(checked + trained_on, args.allow_patient_overlap, note, first_only=True)
    leakage["notes"] = notes
    return checked, trained_on, leakage, vote_ks


def training_splits(checkpoint, log):
    """The checkpoint's training and validation lists as splits.Split, read without their images;
    lists that cannot be found here are skipped and returned as notes."""
    found, notes = [], []
    args = run_data.recorded_run(checkpoint)
    if not args:
        return found, ["the checkpoint records no training lists (bare weights): not checked"]
    formats = {"train": LIST_FORMAT[args["dataset"]],
               "validation": LIST_FORMAT[args.get("val_dataset") or args["dataset"]]}  # its own, if given
    candidates = [("train", split_folder(args["dataset"], args.get("dataset_dir") or ".", "train"),
                   args.get("train_image_list"))]
    if run_data.separate_validation(args):
        candidates.append(("validation", args.get("val_dataset_dir"), args.get("val_image_list")))
    for name, root, list_file in candidates:
        list_format = formats[name]
        if (list_format != "folder" and not (list_file and Path(list_file).is_file())) or not Path(root).is_dir():
            notes.append(f"{name} list of the checkpoint ({list_file or root}) not found here: not checked")
            continue
        found.append(splits.Split.from_list(name, root, list_file, list_format,
                                            run_data.list_options(args, "train" if name == "train" else "val")))
    for note in notes:
        log(f"note: {note}")
    return found, notes
