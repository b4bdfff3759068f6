"""Evaluate a checkpoint: retrieval (R@K, mAP, mP@K) and majority-vote kNN classification.

Leave-one-out on a test list (every test image queries all the others):
    python test.py --dataset covid --test-dataset-dir ./data/test \
        --test-image-list ./test_COVIDx4.txt --resume ./checkpoints/<run>_best_ckpt.pth
Query-gallery (test images against the training database):
    python test.py ... --gallery-dataset-dir ./data/train --gallery-image-list ./train_split.txt
After `python train.py --dataset demo`:
    python test.py --dataset demo --resume checkpoints/demo/demo_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth
Several processes (each embeds a shard of the images; rank 0 computes the metrics and writes):
    torchrun --nproc_per_node=4 test.py ...

The model is rebuilt from the checkpoint; model flags are only needed for a bare state dict
(the seed's checkpoints) and must agree with the checkpoint otherwise. Writes a JSON report
(--report, default next to the checkpoint) and the embeddings as .npz (--save-dir).
"""
import argparse
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import ood
import utils
from dataset import ImageListDataset, build_transform
from metrics import evaluate_retrieval
from model import MODEL_NAMES, NECKS, build_model
from presets import DATASETS, LIST_FORMAT, PAPER_DEFAULTS, setup_defaults

KS = (1, 5, 10)
VOTE_KS = (1, 5, 10, 15, 20)
MODEL_FLAGS = ("model", "embedding_dim", "img_size", "convnext_name", "vit_name", "neck")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Evaluate a retrieval checkpoint", add_help=add_help)
    parser.add_argument("--resume", required=True, help="checkpoint (full, or a bare state dict)")
    # Model: read from the checkpoint; give them only for a bare state dict.
    parser.add_argument("--model", choices=MODEL_NAMES, help="architecture (from the checkpoint)")
    parser.add_argument("--embedding-dim", type=int, help="embedding size (from the checkpoint)")
    parser.add_argument("--img-size", type=int, help="input size (from the checkpoint)")
    parser.add_argument("--convnext-name", help="timm ConvNeXt name (from the checkpoint)")
    parser.add_argument("--vit-name", help="timm ViT name (from the checkpoint)")
    parser.add_argument("--neck", choices=NECKS, help="embedding head's neck (from the checkpoint; "
                        "bare state dicts: none unless given)")
    # Data
    parser.add_argument("--dataset", default="covid", choices=DATASETS, help="list format, as in train.py")
    parser.add_argument("--test-dataset-dir", help="folder of the test images (default ./data/test)")
    parser.add_argument("--test-image-list", help="test list (default ./test_COVIDx4.txt)")
    parser.add_argument("--gallery-dataset-dir", help="gallery images: query-gallery protocol")
    parser.add_argument("--gallery-image-list", help="gallery list, e.g. the training list")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data loading processes")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="images per batch")
    # Speed
    parser.add_argument("--amp", default="auto", choices=("auto", *utils.AMP_DTYPES),
                        help="mixed precision; auto = bf16 on CUDA from compute capability 8, "
                        "fp16 on older GPUs, none on CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="channels-last memory format (default: on for CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    # Outputs
    parser.add_argument("--report", help="JSON report path (default: <checkpoint>_report.json)")
    parser.add_argument("--save-dir", help="where the embeddings .npz goes (default: the checkpoint's folder)")
    parser.add_argument("--ood", action="store_true",
                        help="add per-query out-of-distribution scores and flags to the report "
                        "(the detector that ood.py fitted for this checkpoint)")
    parser.add_argument("--ood-detector", help="detector file (default <checkpoint stem>_ood.pth)")
    return parser


def model_config_from(checkpoint, args):
    """The checkpoint's model config; flags may repeat it but not contradict it."""
    stored = checkpoint.get("model_config") if isinstance(checkpoint, dict) else None
    given = {key: getattr(args, key) for key in MODEL_FLAGS if getattr(args, key) is not None}
    if stored is None:  # bare state dict: the flags (or the paper's defaults) describe the model
        if "model" not in given:
            raise SystemExit(f"error: {args.resume} holds bare weights without a model config; "
                             "give --model, --embedding-dim and --img-size (and backbone names)")
        defaults = {key: PAPER_DEFAULTS[key] for key in MODEL_FLAGS if key in PAPER_DEFAULTS}
        return {"name": given.pop("model"), **defaults, **given}
    stored_flags = {("model" if key == "name" else key): value for key, value in stored.items()}
    clashes = [f"--{key.replace('_', '-')} {value} (checkpoint: {stored_flags[key]})"
               for key, value in given.items() if stored_flags.get(key) != value]
    if clashes:
        raise SystemExit(f"error: flags contradict the checkpoint {args.resume}: {'; '.join(clashes)}. "
                         "Drop them: the model is rebuilt from the checkpoint")
    return dict(stored)


def print_report(report):
    print(f"\n{report['protocol']}: {report['num_queries']} queries, gallery of {report['num_gallery']}")
    print("  " + "   ".join(f"R@{k} {v:6.2f}" for k, v in report["recall_at_k"].items()))
    print(f"  mAP {report['map']:6.2f}")
    print("  " + "   ".join(f"mP@{k} {v:6.2f}" for k, v in report["precision_at_k"].items()))
    print("\nmajority-vote kNN classification (%)")
    columns = ("accuracy", "precision_macro", "recall_macro", "f1_macro",
               "precision_weighted", "recall_weighted", "f1_weighted")
    print("    k " + " ".join(f"{c:>18}" for c in columns))
    for k, row in report["classification"].items():
        print(f"  {k:>3} " + " ".join(f"{row[c]:18.2f}" for c in columns))
    for k, row in report["classification"].items():
        print(f"\nconfusion matrix, k={k} (rows: true {', '.join(report['classes'])}; columns: predicted)")
        for line in row["confusion_matrix"]:
            print("  " + " ".join(f"{n:6d}" for n in line))
    if "ood" in report:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in report["ood"]["flagged_share"].items())
        print(f"\nout-of-distribution flags (thresholds at {report['ood']['tpr']:.0%} TPR): {shares}")


def main(args):
    runtime = utils.setup_runtime(args.device)
    try:
        return run(args, runtime)
    finally:
        utils.cleanup_runtime(runtime)


def run(args, runtime):
    args.amp = utils.resolve_amp(args.amp, str(runtime.device))
    if args.channels_last is None:
        args.channels_last = runtime.device.type == "cuda"
    checkpoint = utils.load_checkpoint(args.resume)
    config = model_config_from(checkpoint, args)
    model = build_model(**config, pretrained=False)
    utils.load_model_weights(model, utils.state_dict_of(checkpoint), args.resume)
    model.to(runtime.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    detector = None
    if args.ood:  # before any embedding: a missing or stale detector is found at once
        fingerprint = utils.model_fingerprint(config, model.state_dict())
        detector = ood.load_for_model(args.resume, fingerprint, args.ood_detector)

    demo = args.dataset == "demo"
    defaults = setup_defaults(args.dataset)
    test_dir = args.test_dataset_dir or str(Path(defaults["dataset_dir"]) / "test")
    test_list = args.test_image_list or (str(Path(defaults["dataset_dir"]) / "test_split.txt") if demo
                                         else defaults["test_image_list"])
    classes = checkpoint.get("classes") if isinstance(checkpoint.get("classes"), list) else None
    transform = build_transform(config["img_size"], train=False)
    list_format = LIST_FORMAT[args.dataset]
    query_set = ImageListDataset(test_dir, test_list, list_format, classes, transform)
    classes = query_set.classes

    def embed(dataset):
        # Under torchrun each rank embeds its shard; extract_embeddings gathers them in order.
        loader = DataLoader(dataset, batch_size=args.eval_batch_size, num_workers=args.workers,
                            sampler=utils.ShardSampler(len(dataset), runtime),
                            pin_memory=runtime.device.type == "cuda")
        return utils.extract_embeddings(model, loader, runtime, args.amp, args.channels_last)

    query_emb, query_labels = embed(query_set)
    if args.gallery_image_list or args.gallery_dataset_dir:
        if not (args.gallery_image_list or args.dataset == "folder") or not args.gallery_dataset_dir:
            raise SystemExit("error: the query-gallery protocol needs --gallery-dataset-dir and "
                             "--gallery-image-list (only the folder for --dataset folder)")
        gallery_set = ImageListDataset(args.gallery_dataset_dir, args.gallery_image_list,
                                       list_format, classes, transform)
        gallery_emb, gallery_labels = embed(gallery_set)
        protocol, num_gallery = "query-gallery", len(gallery_set)
    else:
        gallery_set = gallery_emb = gallery_labels = None
        protocol, num_gallery = "leave-one-out", len(query_set)

    if not runtime.is_main:  # the metrics and every file are rank 0's
        return None
    metrics = evaluate_retrieval(query_emb, query_labels, gallery_emb, gallery_labels,
                                 ks=KS, vote_ks=VOTE_KS, num_classes=len(classes))
    report = {"checkpoint": str(args.resume), "model": config["name"],
              "embedding_dim": config["embedding_dim"], "classes": classes,
              "num_queries": len(query_set), "num_gallery": num_gallery, "protocol": protocol,
              **metrics}
    if detector is not None:
        scores = detector.scores(query_emb)
        flags = detector.flags(query_emb, scores)
        report["ood"] = {"detector": str(args.ood_detector or ood.default_detector_path(args.resume)),
                         "tpr": detector.tpr,
                         "thresholds": detector.thresholds,
                         "flagged_share": {name: float(flag.mean()) for name, flag in flags.items()},
                         "queries": [{"path": str(path), **{name: float(scores[name][i]) for name in scores},
                                      "flagged": {name: bool(flags[name][i]) for name in flags}}
                                     for i, path in enumerate(query_set.paths)]}
    print_report(report)

    checkpoint_path = Path(args.resume)
    report_path = Path(args.report or checkpoint_path.with_name(checkpoint_path.stem + "_report.json"))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    utils.write_json(report_path, report)
    save_dir = Path(args.save_dir or checkpoint_path.parent)
    save_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"query_embeddings": query_emb.cpu().numpy(), "query_labels": query_labels.cpu().numpy(),
              "query_paths": np.array([str(p) for p in query_set.paths]), "classes": np.array(classes)}
    if gallery_set is not None:
        arrays.update(gallery_embeddings=gallery_emb.cpu().numpy(),
                      gallery_labels=gallery_labels.cpu().numpy(),
                      gallery_paths=np.array([str(p) for p in gallery_set.paths]))
    npz_path = save_dir / f"{checkpoint_path.stem}_embeddings.npz"
    np.savez(npz_path, **arrays)
    print(f"\nreport: {report_path}\nembeddings: {npz_path}")
    return report


if __name__ == "__main__":
    utils.run_cli(lambda: main(get_args_parser().parse_args()))
