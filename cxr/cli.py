"""The command-line side every program shares: one `error:` line for a user's mistake
(run_cli), --debug, the arguments printed at the start of a run, and the flags several programs
take (one definition each; where a flag means something else in one program, such as
--dataset-dir, the program passes its own meaning)."""
import os
import sys
import textwrap

from cxr.errors import RunStopped, UserError


def run_cli(main, *args):
    """main(*args) for a command-line program: a user mistake (UserError, a dataset or
    pretrained-weights problem, a SystemExit with a message) ends in one `error: ...` line on
    stderr and exit code 2, as argparse does; a run that stopped itself (RunStopped, a
    non-finite loss) in one such line and exit code 1. --debug (anywhere on the command line)
    or HYBRID_DEBUG=1 shows the traceback instead."""
    from dataset import DatasetError  # here, not at the top: dataset imports torchvision
    from model import PretrainedWeightsError

    debug = os.environ.get("HYBRID_DEBUG", "0").lower() not in ("0", "", "false", "no")
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        debug = True
    hint = "(--debug or HYBRID_DEBUG=1 shows the traceback)"
    try:
        return main(*args)
    except SystemExit as error:
        if isinstance(error.code, str) and not debug:
            print(error.code if error.code.startswith("error:") else f"error: {error.code}",
                  file=sys.stderr)
            sys.exit(2)
        raise
    except (UserError, DatasetError, PretrainedWeightsError) as error:
        if debug:
            raise
        print(f"error: {error}\n{hint}", file=sys.stderr)
        sys.exit(2)
    except (RunStopped, FloatingPointError) as error:
        if debug:
            raise
        print(f"error: {error}\n{hint}", file=sys.stderr)
        sys.exit(1)


def add_debug_flag(parser):
    """--debug in a program's --help; run_cli acts on it (and removes it) before parsing."""
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one 'error:' line "
                        "(or set HYBRID_DEBUG=1)")
    return parser


def print_args(args, runtime, parser=None, width=100):
    """The run's arguments, one group of `parser` (its argument groups) a line, wrapped at `width`
    columns; those of no group (or without a parser) sorted under "other"."""
    if not runtime.is_main:
        return
    values, groups = vars(args), {}
    for group in (parser._action_groups if parser is not None else []):
        names = [a.dest for a in group._group_actions if a.dest in values and a.dest != "help"]
        if names and group.title not in ("positional arguments", "options", "optional arguments"):
            groups[group.title] = names
    grouped = {name for names in groups.values() for name in names}
    rest = sorted(name for name in values if name not in grouped)
    if rest:
        groups["other"] = rest
    lines = ["arguments:"]
    for title, names in groups.items():
        words = " ".join(f"{name}={values[name]}" for name in names)
        lines.append(textwrap.fill(f"{title}: {words}", width, initial_indent="  ", subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False))
    print("\n".join(lines), flush=True)


def add_progress_flag(parser):
    parser.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                        help="progress of long loops: bar (tqdm), log (a timestamped line per phase and at most "
                        "one every 30 s), none; auto: a bar on a terminal, log lines in a file or pipe")


# --------------------------------------------------------------------------------------------
# Flags several programs take
# --------------------------------------------------------------------------------------------
def add_device_flag(parser):
    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N")


def add_workers_flag(parser, default, help="data loading processes"):
    parser.add_argument("--workers", type=int, default=default, help=help)


def add_resume_flag(parser, help, required=True):
    parser.add_argument("--resume", required=required, help=help)


def add_dataset_flag(parser, help, default=None):
    from cxr.presets import DATASETS  # here: presets imports the models, which a parser need not

    parser.add_argument("--dataset", default=default, choices=DATASETS, help=help)


def add_public_list_flags(parser, recorded=False, mimic_split=None):
    """The options of the public data sets' lists (--dataset nih, chexpert, mimic); recorded: the
    defaults are the checkpoint's run's (test.py and the other programs that read a checkpoint);
    mimic_split: the default of --mimic-split, the split of MIMIC-CXR's split file the program's
    list reads (None: no such flag; train.py reads train, validate and test by role)."""
    from cxr.public_lists import MIMIC_SPLITS, UNCERTAIN_POLICIES, VIEWS

    if mimic_split:
        parser.add_argument("--mimic-split", choices=MIMIC_SPLITS, default=mimic_split,
                            help="MIMIC-CXR: the split of the split file the list reads")
    defaults = (None, None) if recorded else ("frontal", "zeros")
    source = " (default: the checkpoint's, else frontal)" if recorded else ""
    parser.add_argument("--views", choices=VIEWS, default=defaults[0],
                        help=f"CheXpert, MIMIC-CXR (and NIH): the films of which view (frontal: PA and AP){source}")
    parser.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default=defaults[1],
                        help="CheXpert, MIMIC-CXR: an uncertain label (-1) counts as negative (zeros) or "
                        "positive (ones); blank is negative")
    parser.add_argument("--label-file", help="NIH: Data_Entry_2017.csv, MIMIC-CXR: mimic-cxr-2.0.0-chexpert.csv(.gz) "
                        "(default: beside the list)")
    parser.add_argument("--metadata-file", help="MIMIC-CXR: mimic-cxr-2.0.0-metadata.csv(.gz) (default: beside "
                        "the split file)")


def add_dataset_dir_flag(parser, meaning, required=False):
    """--dataset-dir is the folder holding train/ and test/ for train.py and ood.py, and the
    images' own folder for retrieve.py and explain.py: `meaning` is this program's."""
    parser.add_argument("--dataset-dir", required=required, help=meaning)


# --rerank's parameter flags: (flag, Rerank field, type, the methods that use it, help)
RERANK_PARAMETERS = (
    ("--rerank-k", "k", int, ("aqe", "dba"), "neighbours (0: plain ranking)"),
    ("--rerank-alpha", "alpha", float, ("aqe", "dba"), "neighbour weight max(similarity, 0) ** alpha (0: plain mean)"),
    ("--rerank-k1", "k1", int, ("kreciprocal",), "reciprocal neighbourhood"),
    ("--rerank-k2", "k2", int, ("kreciprocal",), "local query expansion (1: none)"),
    ("--rerank-jaccard-weight", "jaccard_weight", float, ("kreciprocal",),
     "weight of the Jaccard distance (Zhong et al.'s 1 - lambda; 0: plain ranking)"),
)


def add_rerank_flags(parser):
    """--rerank and its parameters (cxr/reranking.py); rerank_from_args reads them. The
    parameters default to None, so that one given to a method that does not use it is refused."""
    from cxr.reranking import METHODS, Rerank

    defaults = Rerank()
    group = parser.add_argument_group("re-ranking (a training-free second pass; cxr/reranking.py)")
    group.add_argument("--rerank", choices=METHODS, default="none",
                       help="none (default), aqe (alpha query expansion), dba (database-side "
                       "augmentation), kreciprocal (k-reciprocal Jaccard re-ranking)")
    for flag, field, kind, methods, meaning in RERANK_PARAMETERS:
        group.add_argument(flag, type=kind, default=None,
                           help=f"{', '.join(methods)}: {meaning}; default {getattr(defaults, field):g}")


def rerank_from_args(args):
    """The reranking.Rerank of the flags; a wrong value, or a parameter the method does not use,
    is the user's error, naming the flag."""
    from cxr.reranking import Rerank

    given = {}
    for flag, field, _, methods, _ in RERANK_PARAMETERS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if args.rerank not in methods:
            raise UserError(f"{flag} is a parameter of --rerank {' or '.join(methods)}, not of --rerank "
                            f"{args.rerank}: drop it or choose that method")
        given[field] = value
    try:
        return Rerank(args.rerank, **given)
    except ValueError as error:
        raise UserError(f"--rerank {args.rerank}: {error} (see --help, re-ranking)") from error
