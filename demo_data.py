"""Write a synthetic chest X-ray phantom data set: the images `python train.py --dataset demo`
trains on (generated there when absent), with COVIDx lists and lung, heart and lesion masks.

    python demo_data.py --out data/demo --train-per-class 60 --test-per-class 20 \\
        --size 256 --seed 0 [--sixteen-bit] [--preview preview.png]

Multi-label phantoms (20% of the films with two findings, follow-up films, lateral views,
uncertain labels) in the layout of NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG or a CSV list, to
try those readers and multi-label training (cxr/multilabel_demo.py):

    python demo_data.py --multilabel nih --out data/demo_nih [--train-films 1000 --test-films 400]
    python train.py --dataset nih --dataset-dir data/demo_nih --setup small

A real labelled image set that ships inside scikit-learn (its 1,797 handwritten digits), in the
same COVIDx layout, to check that a choice made on the phantoms holds on real images
(cxr/digits_data.py):

    python demo_data.py --real digits --out data/digits

What a phantom looks like (five findings, anatomy, confounders): cxr/phantom.py; the layout on
disk: cxr/demo_dataset.py. Same arguments -> byte-identical files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cxr.cli import add_debug_flag, run_cli
from cxr.demo_dataset import save_preview, write_demo_dataset
from cxr.digits_data import REAL_SETS, write_digits_dataset
from cxr.errors import UserError
from cxr.multilabel_demo import LAYOUTS, write_multilabel_demo
from cxr.phantom import CLASSES


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate the synthetic chest X-ray phantom dataset.")
    parser.add_argument("--out", type=Path, default=None, help="output folder (must not exist or be empty)")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sixteen-bit", action="store_true", help="16-bit PNGs holding 12-bit values 0..4095")
    parser.add_argument("--preview", type=Path, default=None, help="also save a grid picture of samples per class")
    group = parser.add_argument_group("multi-label phantoms")
    group.add_argument("--multilabel", choices=LAYOUTS, help="write multi-label phantoms in this data set's layout")
    group.add_argument("--train-films", type=int, default=1000, help="films of the training list")
    group.add_argument("--test-films", type=int, default=400, help="films of the test list")
    group.add_argument("--pair-share", type=float, default=0.2, help="share of films with two findings")
    parser.add_argument("--real", choices=REAL_SETS,
                        help="write a real labelled image set shipped inside a package (scikit-learn's digits)")
    return add_debug_flag(parser)


def main(args: argparse.Namespace) -> None:
    if args.out is None and args.preview is None:
        raise SystemExit("nothing to do: give --out and/or --preview")
    if args.real:
        if args.out is None:
            raise SystemExit("--real needs --out, the folder to write the data set into")
        defaults = get_args_parser()
        phantom_flags = [f"--{key.replace('_', '-')}" for key in ("multilabel", "sixteen_bit", "size",
                         "train_per_class", "test_per_class", "train_films", "test_films", "pair_share", "preview")
                         if getattr(args, key) != defaults.get_default(key)]
        if phantom_flags:
            raise SystemExit(f"--real {args.real} writes the set as it ships (8 x 8 px, 8-bit, single-label, "
                             f"its own split): drop {', '.join(phantom_flags)}, which shape the phantoms")
        write_digits_dataset(args.out, args.seed)
        print(f"Wrote scikit-learn's digits in the COVIDx layout to {args.out}")
    elif args.multilabel:
        if args.out is None:
            raise SystemExit("--multilabel needs --out, the folder to write the data set into")
        write_multilabel_demo(args.out, args.multilabel, args.train_films, args.test_films, args.size, args.seed,
                              args.pair_share)
        print(f"Wrote {args.train_films} + {args.test_films} multi-label phantom films ({args.size}px, "
              f"{args.multilabel} layout) to {args.out}")
    elif args.out is not None:
        write_demo_dataset(
            args.out, args.train_per_class, args.test_per_class, args.size, args.seed, args.sixteen_bit
        )
        n = (args.train_per_class + args.test_per_class) * len(CLASSES)
        print(f"Wrote {n} phantom images ({args.size}px) to {args.out}")
    if args.preview is not None:
        save_preview(args.preview, seed=args.seed)
        print(f"Saved preview grid to {args.preview}")


def cli():
    """main, with a folder that holds files or a negative count as the user's error."""

    try:
        main(get_args_parser().parse_args())
    except (FileExistsError, ValueError) as error:
        raise UserError(str(error)) from error


if __name__ == "__main__":

    run_cli(cli)
