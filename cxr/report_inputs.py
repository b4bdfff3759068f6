"""What test.py evaluates when a flag is left out, and which majority votes a list can hold.

Inputs. A checkpoint written by train.py records its run (checkpoint["args"]: dataset,
dataset_dir, test_image_list) and the bit depth its 16-bit images were scaled by
(checkpoint["bit_depth"]), so `python test.py --resume CKPT` alone evaluates the run's own test
list, as explain.py and ood.py already read their inputs from it. Each input comes from its
flag when given, else from the checkpoint, else from the defaults of the data set
(presets.setup_defaults); the report records which (report["inputs"]). The recorded paths
belong to the recorded data set: with --dataset naming another one they are not used.

Vote sizes. The majority vote at k needs k neighbours per query; a query of a small list has
fewer (leave-one-out: the list less the query and the other films of its patient). Default
sizes that cannot be met are left out with one line saying so; a size asked for with
--vote-ks that cannot be met is an error.
"""
from collections import Counter
from pathlib import Path

from cxr import run_data
from cxr.checkpoints import data_bit_depth
from cxr.errors import UserError
from cxr.images import BIT_DEPTHS
from cxr.presets import LIST_FORMAT, WHOLE_FOLDER_FORMATS, setup_defaults, split_folder
from cxr.public_lists import default_lists

KS = (1, 5, 10)  # R@K and mP@K, the report's keys
VOTE_KS = (1, 5, 10, 15, 20)
DEFAULT_VOTE_K = 10


def _entry(value, source):
    return {"value": value, "from": source}


def resolve_inputs(args, checkpoint):
    """{"dataset", "test_dataset_dir", "test_image_list", "bit_depth": {"value", "from"}}, each
    from "flag", "checkpoint" or "default". bit_depth's value is an int or "auto" (scan)."""
    run = run_data.recorded_run(checkpoint)
    inputs = {}
    if args.dataset is not None:
        inputs["dataset"] = _entry(args.dataset, "flag")
    elif run:
        inputs["dataset"] = _entry(run["dataset"], "checkpoint")
    else:
        inputs["dataset"] = _entry("covid", "default")
    dataset = inputs["dataset"]["value"]
    recorded = run if run.get("dataset") == dataset else {}  # another data set's paths do not apply
    defaults = setup_defaults(dataset)

    if args.test_dataset_dir is not None:
        inputs["test_dataset_dir"] = _entry(str(args.test_dataset_dir), "flag")
    elif recorded.get("dataset_dir"):
        inputs["test_dataset_dir"] = _entry(str(split_folder(dataset, recorded["dataset_dir"], "test")), "checkpoint")
    else:
        inputs["test_dataset_dir"] = _entry(str(split_folder(dataset, defaults["dataset_dir"], "test")), "default")

    if LIST_FORMAT[dataset] == "folder":  # the folder is read, no list: name none
        if args.test_image_list is not None:
            raise UserError("--dataset folder reads <test-dataset-dir>/<label>/ files, no list; "
                                  "drop --test-image-list or give the list's format with --dataset")
        inputs["test_image_list"] = _entry(None, "not used (folder layout)")
    elif args.test_image_list is not None:
        inputs["test_image_list"] = _entry(str(args.test_image_list), "flag")
    elif recorded.get("test_image_list"):
        inputs["test_image_list"] = _entry(str(recorded["test_image_list"]), "checkpoint")
    elif LIST_FORMAT[dataset] in WHOLE_FOLDER_FORMATS:  # the data set's own test list in its folder
        inputs["test_image_list"] = _entry(default_lists(dataset, inputs["test_dataset_dir"]["value"])[1], "default")
    elif dataset == "demo":  # train.py's demo default: the list beside the images
        inputs["test_image_list"] = _entry(str(Path(defaults["dataset_dir"]) / "test_split.txt"), "default")
    else:
        inputs["test_image_list"] = _entry(defaults["test_image_list"], "default")

    depth = data_bit_depth(checkpoint)
    if args.bit_depth is not None:
        inputs["bit_depth"] = _entry("auto" if args.bit_depth == "auto" else int(args.bit_depth), "flag")
    elif depth is not None:
        inputs["bit_depth"] = _entry(depth, "checkpoint")
    else:  # 8-bit training data, or a checkpoint older than the record: scan the list
        inputs["bit_depth"] = _entry("auto", "default")
    _check_recorded_paths(inputs, dataset)
    return inputs


def _check_recorded_paths(inputs, dataset):
    """Paths read from the checkpoint were true on the machine that trained; say so when they
    are not true here, rather than let a loader report a path nobody typed."""
    flags = {"test_dataset_dir": "--test-dataset-dir", "test_image_list": "--test-image-list"}
    for key, flag in flags.items():
        entry = inputs[key]
        if entry["from"] != "checkpoint" or Path(entry["value"]).exists():
            continue
        if key == "test_image_list" and LIST_FORMAT[dataset] == "folder":
            continue
        raise UserError(f"the checkpoint's {key.replace('_', ' ')} {entry['value']} (recorded when it "
                              f"was trained) is not here; give {flag}")


def describe(inputs):
    """One line: each input and where it came from."""
    return "inputs: " + "; ".join(f"{key.replace('_', ' ')} {entry['value']} ({entry['from']})"
                                  for key, entry in inputs.items())


# --------------------------------------------------------------------------------------------
# Vote sizes
# --------------------------------------------------------------------------------------------
def neighbours_available(query_patients, gallery_patients=None, exclude_same_patient=True):
    """Neighbours every query has: leave-one-out (gallery_patients None) the list less the
    query and, when they are left out, the other films of its patient; query-gallery the
    gallery less the query's patient's films. The smallest over the queries."""
    if gallery_patients is None:
        n = len(query_patients)
        if not exclude_same_patient or n == 0:
            return max(n - 1, 0)
        return n - max(Counter(query_patients).values())
    if not exclude_same_patient:
        return len(gallery_patients)
    counts = Counter(gallery_patients)
    return len(gallery_patients) - max((counts.get(p, 0) for p in set(query_patients)), default=0)


def choose_vote_ks(requested, available, log=print, what="each query"):
    """(vote sizes, the default sizes left out). `requested` is --vote-ks (None: the defaults,
    of which those above `available` are left out with one line); a requested size above
    `available` is an error."""
    if requested is None:
        kept = tuple(k for k in VOTE_KS if k <= available)
        left_out = [k for k in VOTE_KS if k > available]
        if not kept:
            raise UserError(f"{what} has no neighbour to vote ({available} available); "
                                  "evaluate a larger list")
        if left_out:
            log(f"note: majority votes of {', '.join(map(str, left_out))} neighbours left out: "
                f"{what} has only {available} (give --vote-ks to choose the sizes)")
        return kept, left_out
    if any(k < 1 for k in requested):
        raise UserError(f"--vote-ks {' '.join(map(str, requested))}: sizes are positive integers")
    too_big = sorted(k for k in set(requested) if k > available)
    if too_big:
        raise UserError(f"--vote-ks {', '.join(map(str, too_big))}: {what} has only {available} "
                              f"neighbours; choose sizes up to {available}")
    return tuple(sorted(set(requested))), []


def choose_vote_k(vote_k, vote_ks):
    """The vote drawn as a confusion matrix and analysed for abstention: --vote-k, which must
    be among the sizes evaluated, or by default 10 (the largest size when 10 is not one)."""
    if vote_k is None:
        return DEFAULT_VOTE_K if DEFAULT_VOTE_K in vote_ks else max(vote_ks)
    if vote_k not in vote_ks:
        raise UserError(f"--vote-k {vote_k} is not among the vote sizes evaluated "
                              f"({', '.join(map(str, vote_ks))}); choose one of them or add it to --vote-ks")
    return vote_k


BIT_DEPTH_CHOICES = ("auto", *map(str, BIT_DEPTHS))
