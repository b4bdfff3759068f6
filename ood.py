"""Out-of-distribution guard on retrieval embeddings: is a query a chest X-ray like the gallery's?

    detector = OODDetector().fit(gallery_emb, gallery_labels, classes)   # (N, D) unit vectors
    detector.calibrate(held_out_in_distribution_emb, tpr=0.95)          # one threshold per score
    scores = detector.scores(query_emb)        # {"msp": (Q,), "energy": ..., "mahalanobis": ..., "knn": ...}
    flags = detector.flags(query_emb)          # {score: (Q,) bool}, True = out of distribution
    detector.save(path); detector = OODDetector.load(path)

Every score is "higher = more out-of-distribution":

- msp          1 - maximum softmax probability over the logits cos(x, prototype_c) / T, where
               prototype_c is the normalised mean embedding of class c (Hendrycks & Gimpel, 2017);
- energy       -T logsumexp_c cos(x, prototype_c) / T (Liu et al., 2020), same logits;
- mahalanobis  distance to the nearest class mean under one covariance shared by the classes
               (Lee et al., 2018), estimated with Ledoit-Wolf shrinkage: a 1024-d covariance from
               a few thousand images is singular without it;
- knn          cosine distance 1 - cos to the k-th nearest fitted embedding (Sun et al., 2022).

T defaults to 1 / the checkpoint's --id-loss-scale (16): the identity loss trained the embedding
to classify with logits of that scale (its class weights, not these prototypes, but they point
the same way). A threshold per score is the `tpr` quantile of that score on held-out
in-distribution images (by default the validation split the checkpoint was selected on), so that
a share `tpr` of them is accepted; scores above it are flagged. The detector stores the model's
fingerprint and is refused by another model.

Command line (labels of the OOD lists are ignored; lists in any train.py format):
    python ood.py --resume CKPT --fit-image-list LIST --fit-dataset-dir DIR \
        --in-image-list LIST --in-dataset-dir DIR \
        --ood-image-list LIST --ood-dataset-dir DIR [--ood-image-list LIST --ood-dataset-dir DIR ...] \
        [--dataset covid|csv|folder] --report OUT.json [--save DETECTOR.pth]
Defaults come from the checkpoint's training run: fit on its training images (without the
validation split), thresholds on its validation images (--calib-image-list), and the in-distribution
images of the report from its test list (--in-image-list).
On the demo (after `make demo`; the probe sets come from ood_probes.py):
    python ood_probes.py --out data/ood_probes
    python ood.py --dataset demo --resume runs/demo/<name>_best_ckpt.pth --probe-dir data/ood_probes
writes the report and the fitted detector, by default beside the checkpoint as
<checkpoint stem>_ood.pth, which test.py --ood loads. The report gives, per score and OOD set, two
kinds of rates (detection_metrics), kept apart because they answer different questions:
- deployed_tpr, deployed_fpr: at the saved threshold (set on the calibration images), what the
  guard does once deployed: the share of in-distribution test images and of OOD images accepted;
- auroc, refit_fpr (refit_tpr): how separable the scores are on the test images, free of any
  validation-to-test shift: refit_fpr is the usual "FPR at 95% TPR" (at --tpr), with a threshold
  re-fitted on the in-distribution test scores, which no deployed guard can do.
"""
import argparse
import os
from pathlib import Path

import torch

from cxr import cli, image_cache, progress, run_data
from cxr.atomic_files import write_json
from cxr.checkpoints import data_bit_depth, load_trained_model
from cxr.embeddings import extract_embeddings
from cxr.ood_detector import SCORES, OODDetector, default_detector_path, detection_metrics
from cxr.presets import LIST_FORMAT, setup_defaults, split_folder
from cxr.runtime import refuse_distributed, resolve_amp, setup_runtime
from dataset import ImageListDataset, build_transform


# ---------------------------------------------------------------------- command line
def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Fit and evaluate the OOD detector", add_help=add_help)
    cli.add_resume_flag(parser, "trained checkpoint (train.py)")
    cli.add_dataset_flag(parser, "list format, as in train.py (default: the checkpoint's)")
    cli.add_public_list_flags(parser, recorded=True)
    cli.add_dataset_dir_flag(parser, "the folder holding train/ and test/, as in train.py (default: the checkpoint's)")
    parser.add_argument("--fit-image-list", help="images the detector is fitted on, e.g. a gallery "
                        "(default: the checkpoint's training images without its validation split)")
    parser.add_argument("--fit-dataset-dir", help="their folder (default <dataset-dir>/train)")
    parser.add_argument("--calib-image-list", help="held-out in-distribution images that set the "
                        "thresholds (default: the checkpoint's validation data)")
    parser.add_argument("--calib-dataset-dir", help="their folder (default <dataset-dir>/train)")
    parser.add_argument("--in-image-list", help="in-distribution test images, against which the "
                        "OOD sets are measured (default: the checkpoint's test list)")
    parser.add_argument("--in-dataset-dir", help="their folder (default <dataset-dir>/test)")
    parser.add_argument("--ood-image-list", action="append", default=[],
                        help="an OOD list (labels ignored); repeat for several sets")
    parser.add_argument("--ood-dataset-dir", action="append", default=[],
                        help="the folder of each --ood-image-list, in the same order")
    parser.add_argument("--probe-dir", help="a folder written by ood_probes.py: every <set>.txt in "
                        "it is an OOD list with its images in <probe-dir>/<set>/")
    parser.add_argument("--tpr", type=float, default=0.95, help="in-distribution share accepted")
    parser.add_argument("--temperature", type=float,
                        help="T of the msp and energy scores (default: 1 / the checkpoint's --id-loss-scale, or 1/16)")
    parser.add_argument("-k", type=int, default=10, help="neighbour of the knn score")
    parser.add_argument("--report", help="JSON report (default <checkpoint stem>_ood_report.json)")
    parser.add_argument("--save", help="detector file (default <checkpoint stem>_ood.pth)")
    cli.add_workers_flag(parser, min(4, os.cpu_count() or 1))
    image_cache.add_argument(parser)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    cli.add_device_flag(parser)
    cli.add_progress_flag(parser)
    cli.add_debug_flag(parser)
    return parser


def ood_sets(args):
    """[(name, list file, image folder)] of every OOD set asked for."""
    if len(args.ood_image_list) != len(args.ood_dataset_dir):
        raise SystemExit(f"error: {len(args.ood_image_list)} --ood-image-list but "
                         f"{len(args.ood_dataset_dir)} --ood-dataset-dir; give one folder per list")
    sets = [(Path(lst).stem, lst, folder) for lst, folder in zip(args.ood_image_list, args.ood_dataset_dir)]
    if args.probe_dir:
        lists = sorted(Path(args.probe_dir).glob("*.txt"))
        if not lists:
            raise SystemExit(f"error: --probe-dir {args.probe_dir} holds no <set>.txt lists; "
                             "write them with python ood_probes.py --out DIR")
        sets += [(lst.stem, str(lst), str(lst.with_suffix(""))) for lst in lists]
    if not sets:
        raise SystemExit("error: no OOD images: give --ood-image-list and --ood-dataset-dir, or --probe-dir")
    return sets


def main(args):
    progress.set_mode(args.progress)
    refuse_distributed("ood.py")
    runtime = setup_runtime(args.device)
    model, checkpoint, fingerprint = load_trained_model(args.resume, runtime.device)
    config, classes = checkpoint["model_config"], checkpoint["classes"]
    train_args = run_data.recorded_run(checkpoint, args.dataset_dir)
    dataset = args.dataset or train_args.get("dataset", "covid")
    root = Path(args.dataset_dir or train_args.get("dataset_dir") or setup_defaults(dataset)["dataset_dir"])
    list_format = LIST_FORMAT[dataset]
    transform = build_transform(config["img_size"], train=False)
    amp = resolve_amp("auto", str(runtime.device))
    temperature = args.temperature
    if temperature is None:
        scale = train_args.get("id_loss_scale") if train_args.get("id_loss_weight") else None
        temperature = 1.0 / (scale or 16.0)

    def embed(dataset_or_folder, list_file=None, known_classes=None, role="test"):
        data = dataset_or_folder
        if not isinstance(data, ImageListDataset):
            data = ImageListDataset(dataset_or_folder, list_file, list_format, known_classes, transform,
                                    bit_depth=data_bit_depth(checkpoint) or "auto",
                                    multilabel=known_classes is not None and checkpoint.get("findings") is not None,
                                    list_options=run_data.given_list_options(args, train_args, role))
            run_data.use_cache([data], args.cache_dir, config["img_size"])
        data.transform = transform
        loader = torch.utils.data.DataLoader(data, batch_size=args.eval_batch_size, num_workers=args.workers)
        return extract_embeddings(model, loader, runtime, amp)[0].cpu(), data.targets

    splits = None
    if not (args.fit_image_list and args.calib_image_list):
        if not train_args:
            raise SystemExit(f"error: {args.resume} does not record its training run; give "
                             "--fit-image-list and --calib-image-list")
        splits = run_data.training_splits(train_args, runtime, dataset, root, data_bit_depth(checkpoint),
                                          args.cache_dir)
    if args.fit_image_list:
        fit_emb, fit_labels = embed(args.fit_dataset_dir or split_folder(dataset, root, "train"), args.fit_image_list,
                                    classes, "train")
    else:
        fit_emb, fit_labels = embed(splits[0])
    detector = OODDetector(temperature, args.k, fingerprint).fit(fit_emb, fit_labels, classes)
    if args.calib_image_list:
        calib_emb, _ = embed(args.calib_dataset_dir or split_folder(dataset, root, "train"), args.calib_image_list,
                             classes, "val")
    elif splits[1] is not None:
        calib_emb, _ = embed(splits[1])
    else:
        raise SystemExit(f"error: {args.resume} was trained without validation data "
                         "(--val-fraction 0); give --calib-image-list")
    thresholds = detector.calibrate(calib_emb, args.tpr)
    in_list = args.in_image_list or train_args.get("test_image_list")
    in_emb, _ = embed(args.in_dataset_dir or split_folder(dataset, root, "test"), in_list, classes)
    in_scores = detector.scores(in_emb)
    results = []
    for name, list_file, folder in ood_sets(args):
        ood_emb, _ = embed(folder, list_file)  # labels of OOD lists are ignored
        ood_scores = detector.scores(ood_emb)
        for score in SCORES:
            results.append({"score": score, "ood_set": name, "num_images": len(ood_emb),
                            **detection_metrics(in_scores[score], ood_scores[score], args.tpr,
                                                threshold=thresholds[score])})
    in_flagged = {name: float(flag.mean()) for name, flag in detector.flags(in_emb, in_scores).items()}
    report = {"checkpoint": str(args.resume), "tpr": args.tpr, "temperature": temperature,
              "k": args.k, "num_fit": len(fit_emb), "num_calibration": len(calib_emb),
              "num_in": len(in_emb), "in_flagged_share": in_flagged,
              "results": results, "thresholds": thresholds}
    print(f"\nOOD detection: fitted on {len(fit_emb)} images, thresholds at {args.tpr:.0%} TPR on "
          f"{len(calib_emb)} held-out images (in-distribution test images flagged: "
          + ", ".join(f"{k} {v:.1%}" for k, v in in_flagged.items()) + ")")
    sets = list(dict.fromkeys(r["ood_set"] for r in results))
    # Both FPRs side by side, labelled, so the re-fitted one is never read as the guard's.
    print(f"  per score: AUROC / FPR at {args.tpr:.0%} TPR re-fitted on the test scores / FPR at the "
          "saved (deployed) threshold")
    print(f"  {'set':<14}" + "".join(f"{s:>26}" for s in SCORES))
    for name in sets:
        row = {r["score"]: r for r in results if r["ood_set"] == name}
        print(f"  {name:<14}" + "".join(f"{row[s]['auroc']:>10.3f} / {row[s]['refit_fpr']:.3f} / "
                                        f"{row[s]['deployed_fpr']:.3f}" for s in SCORES))
    # the same for every set: the in-distribution test images accepted at the saved threshold
    print(f"  {'deployed TPR':<14}" + "".join(f"{1 - in_flagged[s]:>26.3f}" for s in SCORES))
    report_path = Path(args.report or Path(args.resume).with_name(Path(args.resume).stem + "_ood_report.json"))
    write_json(report_path, report)
    detector_path = Path(args.save or default_detector_path(args.resume))
    detector.save(detector_path)
    print(f"\nreport: {report_path}\ndetector: {detector_path}")
    return report


if __name__ == "__main__":
    cli.run_cli(lambda: main(get_args_parser().parse_args()))
