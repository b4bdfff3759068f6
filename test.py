"""Evaluate a checkpoint: retrieval (R@K, mAP, mP@K) and majority-vote kNN classification.

Leave-one-out on a test list (every test image queries all the others):
    python test.py --dataset covid --test-dataset-dir ./data/test \
        --test-image-list ./test_COVIDx4.txt --resume ./checkpoints/<run>_best_ckpt.pth
Query-gallery (test images against the training database):
    python test.py ... --gallery-dataset-dir ./data/train --gallery-image-list ./train_split.txt
After `python train.py --dataset demo` (the data flags default to the checkpoint's recorded run:
its --dataset, its --dataset-dir's test/ folder, its test list and its bit depth; flags given
win, and the report's "inputs" says where each came from):
    python test.py --resume checkpoints/demo/demo_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth
Several processes (each embeds a shard of the images; rank 0 computes the metrics and writes):
    torchrun --nproc_per_node=4 test.py ...

With patient intervals (1000 resamples of the test patients) and a paired comparison of two
checkpoints' embeddings of the same list:
    python test.py ... --bootstrap 1000
    python test.py --compare runs/a/<a>_test_split_embeddings.npz runs/b/<b>_test_split_embeddings.npz

The model is rebuilt from the checkpoint; model flags are only needed for a bare state dict
(the seed's checkpoints) and must agree with the checkpoint otherwise. Images of a query's own
patient are left out of its ranking (--keep-same-patient keeps them, as the seed did), and a
patient or file shared with the gallery or the checkpoint's training lists is an error
(--allow-patient-overlap). Writes a JSON report (--report, default next to the checkpoint), the
per-query neighbours and pictures beside it, and the embeddings as .npz (--save-dir). Where
ood.py saved a detector beside the checkpoint (<checkpoint stem>_ood.pth), every query is scored
for being out of distribution, and the count is printed (--no-ood: not; --ood: the detector is
required; see cxr/ood_guard.py).

Multi-label lists (--dataset nih, chexpert, mimic, or a CSV with findings joined by '|'): a gallery
film is relevant when it shares a finding with the query (--relevance exact: the same set), and
the report adds nDCG, per-finding AP and the kNN AUROC per finding (cxr/multilabel_metrics.py):
    python test.py --resume runs/demo_multilabel/nih_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth
A checkpoint evaluated on a list with other findings (another data set) says so and scores the
list's own labels.

Majority votes at k = 1, 5, 10, 15 and 20 by default; on a small list the sizes above the
neighbours a query has are left out (with a note), and --vote-ks chooses the sizes.
"""
import argparse
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxr import (
    cli,
    compare_embeddings,
    eval_lists,
    html_pages,
    image_cache,
    ood_guard,
    progress,
    report_inputs,
    report_stats,
    report_text,
    splits,
)
from cxr.atomic_files import write_json
from cxr.checkpoints import (
    load_checkpoint,
    load_model_weights,
    model_fingerprint,
    state_dict_of,
    strip_wrapper_prefixes,
)
from cxr.embeddings import extract_embeddings, has_branches, mean_branch_shares
from cxr.errors import UserError
from cxr.multilabel_metrics import RELEVANCE, evaluate_multilabel
from cxr.presets import DATASETS, PAPER_DEFAULTS
from cxr.retrieval_metrics import evaluate_retrieval
from cxr.runtime import AMP_DTYPES, ShardSampler, cleanup_runtime, log, resolve_amp, setup_runtime
from model import MODEL_NAMES, NECKS, build_model, options_from_weights

KS = report_inputs.KS
MODEL_FLAGS = ("model", "embedding_dim", "img_size", "convnext_name", "vit_name", "neck")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Evaluate a retrieval checkpoint", add_help=add_help)
    cli.add_resume_flag(parser, "checkpoint (full, or a bare state dict); required unless --compare", required=False)
    # Model: read from the checkpoint; give them only for a bare state dict.
    parser.add_argument("--model", choices=MODEL_NAMES, help="architecture (from the checkpoint)")
    parser.add_argument("--embedding-dim", type=int, help="embedding size (from the checkpoint)")
    parser.add_argument("--img-size", type=int, help="input size (from the checkpoint)")
    parser.add_argument("--convnext-name", help="timm ConvNeXt name (from the checkpoint)")
    parser.add_argument("--vit-name", help="timm ViT name (from the checkpoint)")
    parser.add_argument("--neck", choices=NECKS, help="embedding head's neck (from the checkpoint; "
                        "bare state dicts: none unless given)")
    # Data: each defaults to the checkpoint's recorded run, then to the data set's defaults.
    cli.add_dataset_flag(parser, "list format, as in train.py (default: the checkpoint's, else covid)")
    parser.add_argument("--test-dataset-dir", help="folder of the test images (default: <the checkpoint's "
                        "--dataset-dir>/test, else ./data/test)")
    parser.add_argument("--test-image-list", help="test list (default: the checkpoint's, else "
                        "./test_COVIDx4.txt)")
    parser.add_argument("--bit-depth", choices=report_inputs.BIT_DEPTH_CHOICES,
                        help="bits of the 16-bit PNGs' data (default: the depth the checkpoint was "
                        "trained at, else auto: scanned from the list)")
    parser.add_argument("--gallery-dataset-dir", help="gallery images: query-gallery protocol")
    parser.add_argument("--gallery-image-list", help="gallery list, e.g. the training list")
    parser.add_argument("--gallery-dataset", choices=DATASETS, help="format of the gallery list when it "
                        "differs from the queries' (--dataset), e.g. a COVIDx query list against a CSV gallery")
    cli.add_public_list_flags(parser, recorded=True, mimic_split="test")
    parser.add_argument("--relevance", choices=RELEVANCE, default="any",
                        help="multi-label lists: a gallery film is relevant when it shares a finding with the "
                        "query (any) or has the same findings (exact)")
    cli.add_workers_flag(parser, min(4, os.cpu_count() or 1))
    image_cache.add_argument(parser)
    parser.add_argument("--eval-batch-size", type=int, default=64, help="images per batch")
    # Speed
    parser.add_argument("--amp", default="auto", choices=("auto", *AMP_DTYPES),
                        help="mixed precision; auto = bf16 on CUDA from compute capability 8, "
                        "fp16 on older GPUs, none on CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="channels-last memory format (default: on for CUDA)")
    cli.add_device_flag(parser)
    cli.add_progress_flag(parser)
    # Outputs
    parser.add_argument("--report", help="JSON report path (default: <checkpoint>_report.json)")
    parser.add_argument("--html", action="store_true",
                        help="also write the report as a page beside it (<report>.html, its pictures in "
                        "<report>_html/): metrics with intervals, per class, figures, the lowest-AP queries")
    parser.add_argument("--save-dir", help="where the embeddings .npz goes (default: the checkpoint's folder)")
    parser.add_argument("--ood", action=argparse.BooleanOptionalAction,
                        help="per-query out-of-distribution scores and flags in the report and "
                        "neighbours file, from the detector ood.py fitted for this checkpoint: on by "
                        "default when it is there; --ood makes a missing or stale one an error, "
                        "--no-ood turns it off")
    parser.add_argument("--ood-detector", help="detector file, required when given (default "
                        "<checkpoint stem>_ood.pth, used when it exists)")
    parser.add_argument("--save-embeddings", help="embeddings .npz path (default: <checkpoint stem>_<test "
                        "list stem>[_vs_<gallery list stem>]_embeddings.npz in --save-dir)")
    parser.add_argument("--neighbours", type=int, default=10,
                        help="top neighbours per query written to <report stem>_neighbours.json (default 10; 0: none)")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="confusion matrix, embedding map and risk-coverage PNGs beside the report")
    parser.add_argument("--map", default="pca", choices=("pca", "tsne"),
                        help="2-D projection of the embedding map (tsne: scikit-learn, slower)")
    # Patients and leakage
    parser.add_argument("--keep-same-patient", action="store_true",
                        help="keep images of the query's own patient in its ranking (the seed's "
                        "protocol; near-copies of the query inflate R@1 and mAP)")
    parser.add_argument("--allow-patient-overlap", action="store_true",
                        help="go on when the test list shares patients or files with the gallery "
                        "or the checkpoint's training lists (the report records it)")
    # Statistics
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="resamples of the test patients for 95%% intervals (try 1000; 0: none)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--vote-ks", type=int, nargs="+", metavar="K",
                        help="sizes of the majority votes (default: 1 5 10 15 20, leaving out those "
                        "above the neighbours a query of the list has)")
    parser.add_argument("--vote-k", type=int, default=None,
                        help="the majority vote drawn as a confusion matrix and analysed for abstention")
    parser.add_argument("--abstain-below", type=float,
                        help="vote share under which the vote abstains: the report gives coverage "
                        "and accuracy of the answered queries (the risk-coverage curve covers all)")
    parser.add_argument("--compare", nargs=2, metavar=("A.npz", "B.npz"),
                        help="paired comparison of two models' embeddings of the same list (files "
                        "written by test.py): differences A - B with patient-bootstrap intervals "
                        "and p-values (--bootstrap, default 1000); no checkpoint needed")
    cli.add_rerank_flags(parser)
    cli.add_debug_flag(parser)
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
        config = {"name": given.pop("model"), **defaults, **given}
        # Options no flag names show in the weights (fusion, branch heads, MXA, ViT stem).
        config.update(options_from_weights(strip_wrapper_prefixes(state_dict_of(checkpoint))))
        return config
    stored_flags = {("model" if key == "name" else key): value for key, value in stored.items()}
    clashes = [f"--{key.replace('_', '-')} {value} (checkpoint: {stored_flags[key]})"
               for key, value in given.items() if stored_flags.get(key) != value]
    if clashes:
        raise SystemExit(f"error: flags contradict the checkpoint {args.resume}: {'; '.join(clashes)}. "
                         "Drop them: the model is rebuilt from the checkpoint")
    return dict(stored)


def main(args):
    progress.set_mode(args.progress)
    if args.compare:
        return compare_embeddings.compare(args, library_versions())
    if not args.resume:
        raise SystemExit("error: give --resume CHECKPOINT to evaluate, or --compare A.npz B.npz to "
                         "compare two saved embeddings")
    runtime = setup_runtime(args.device)
    try:
        return run(args, runtime)
    finally:
        cleanup_runtime(runtime)


LOWEST_AP_SHOWN = 5


def write_html(args, report_path, report, per_query, query_set, gallery_set, embedded, written):
    """report.html beside the report: its numbers, figures, and the LOWEST_AP_SHOWN queries with the
    lowest AP with their neighbours."""
    ap = np.asarray(per_query["ap"], dtype=float)
    order = [int(i) for i in np.argsort(np.where(np.isnan(ap), np.inf, ap), kind="stable")
             if not np.isnan(ap[i])][:LOWEST_AP_SHOWN]
    k = min(5, per_query["top_indices"].shape[1])
    records = neighbour_records(per_query, embedded.query, embedded.ranked_against, query_set,
                                gallery_set or query_set, query_set.classes, args.vote_k, k, rows=order)
    lowest = [{**record, "ap": float(ap[i])} for record, i in zip(records, order)]
    figures = {name: path for name, path in written.items() if str(path).endswith(".png")}
    return html_pages.report_page(report_path, report, figures, lowest, bit_depth=query_set.bit_depth)


def embeddings_path(args, checkpoint_path, query_set, gallery_set):
    """Leave-one-out and query-gallery runs (and runs on other lists) get different names."""
    if args.save_embeddings:
        return Path(args.save_embeddings)
    def stem(dataset):
        return Path(dataset.source).stem
    name = f"{checkpoint_path.stem}_{stem(query_set)}"
    if gallery_set is not None:
        name += f"_vs_{stem(gallery_set)}"
    return Path(args.save_dir or checkpoint_path.parent) / f"{name}_embeddings.npz"


def library_versions():
    import sklearn
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def neighbour_records(per_query, query_emb, gallery_emb, query_set, gallery_set, classes, vote_k, k, rows=None):
    """Each query's top k (or only those of the query indices `rows`): path, label, patient and
    similarity, with the vote at vote_k."""
    rows = np.arange(len(query_set)) if rows is None else np.asarray(rows, dtype=np.int64)
    top = per_query["top_indices"][rows, :k]  # (R, k)
    query = query_emb.float().cpu()[torch.from_numpy(rows)]
    gallery = gallery_emb.float().cpu()
    similarities = []
    for start in range(0, len(query), 4096):  # (c, k, D) at a time
        chunk = torch.from_numpy(top[start:start + 4096])
        similarities.append(torch.einsum("cd,ckd->ck", query[start:start + 4096], gallery[chunk]))
    similarities = torch.cat(similarities).numpy() if similarities else np.zeros((0, k))
    gallery_labels = gallery_set.targets.tolist()
    records = []
    for r, i in enumerate(rows.tolist()):
        records.append({
            "query": str(query_set.paths[i]), "label": classes[int(query_set.targets[i])],
            "patient": query_set.patients[i], "vote": classes[int(per_query["votes"][vote_k][i])],
            "vote_share": float(per_query["vote_share"][vote_k][i]),
            "neighbours": [{"path": str(gallery_set.paths[j]), "label": classes[gallery_labels[j]],
                            "patient": gallery_set.patients[j], "similarity": round(float(sim), 6)}
                           for j, sim in zip(top[r].tolist(), similarities[r])]})
    return records


def run(args, runtime):
    """The evaluation, phase by phase: model and OOD detector, lists, leakage, embeddings,
    the report, the files."""
    check_flags(args, runtime)
    checkpoint, config, model, detector, detector_path = load_model(args, runtime)
    if (checkpoint.get("args") or {}).get("shuffle_labels"):
        log(runtime, "note: this checkpoint was trained on permuted labels (train.py --shuffle-labels, the "
                     "data-randomisation check): its numbers are a floor, not a model's result")
    inputs, query_set, gallery_set = eval_lists.load_lists(args, runtime, checkpoint, config)
    checked, trained_on, leakage, vote_ks = eval_lists.check_lists(args, runtime, checkpoint, inputs,
                                                                   query_set, gallery_set)
    embedded = embed_lists(args, runtime, model, query_set, gallery_set)
    if not runtime.is_main:  # the metrics and every file are rank 0's
        return None
    report, per_query = build_report(args, checkpoint, config, model, inputs, query_set, gallery_set, embedded,
                                     vote_ks, checked + trained_on, leakage, detector, detector_path)
    report_text.print_report(report)
    write_outputs(args, checkpoint, config, report, per_query, query_set, gallery_set, embedded)
    return report


def check_flags(args, runtime):
    args.amp = resolve_amp(args.amp, str(runtime.device))
    if args.channels_last is None:
        args.channels_last = runtime.device.type == "cuda"
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise SystemExit(f"error: --bootstrap {args.bootstrap}: give 0 (no intervals) or at least 2 "
                         "resamples (1000 is usual)")
    if args.abstain_below is not None and not 0.0 <= args.abstain_below <= 1.0:
        raise SystemExit(f"error: --abstain-below {args.abstain_below} is a vote share between 0 and 1")
    cli.rerank_from_args(args)  # a wrong re-ranking parameter fails before the embedding


def load_model(args, runtime):
    """(checkpoint, model config, model on the device, OOD detector or None, its path): the
    detector is looked for before any embedding, so a missing or stale one is found at once."""
    checkpoint = load_checkpoint(args.resume)
    config = model_config_from(checkpoint, args)
    model = build_model(**config, pretrained=False)
    load_model_weights(model, state_dict_of(checkpoint), args.resume)
    model.to(runtime.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    detector = detector_path = None
    if args.ood is not False:
        fingerprint = model_fingerprint(config, model.state_dict())
        detector, detector_path = ood_guard.choose(args.ood, args.resume, fingerprint, args.ood_detector,
                                                   log=lambda line: log(runtime, line))
    return checkpoint, config, model, detector, detector_path


@dataclass
class Embedded:
    query: torch.Tensor
    query_labels: torch.Tensor
    query_features: list  # [{branch: pooled features}] for the hybrid, else []
    gallery: torch.Tensor | None  # None: leave-one-out
    gallery_labels: torch.Tensor | None
    gallery_features: list

    @property
    def protocol(self):
        return "leave-one-out" if self.gallery is None else "query-gallery"

    @property
    def ranked_against(self):
        return self.query if self.gallery is None else self.gallery


def embed_lists(args, runtime, model, query_set, gallery_set):
    with_branches = has_branches(model)  # the hybrid: each branch's share of the similarity

    def embed(dataset):
        # Under torchrun each rank embeds its shard; extract_embeddings gathers them in order.
        loader = DataLoader(dataset, batch_size=args.eval_batch_size, num_workers=args.workers,
                            sampler=ShardSampler(len(dataset), runtime),
                            pin_memory=runtime.device.type == "cuda")
        return extract_embeddings(model, loader, runtime, args.amp, args.channels_last,
                                  branch_features=with_branches)

    query_emb, query_labels, *query_features = embed(query_set)
    if gallery_set is None:
        return Embedded(query_emb, query_labels, query_features, None, None, query_features)
    gallery_emb, gallery_labels, *gallery_features = embed(gallery_set)
    return Embedded(query_emb, query_labels, query_features, gallery_emb, gallery_labels, gallery_features)


def build_report(args, checkpoint, config, model, inputs, query_set, gallery_set, embedded, vote_ks, lists,
                 leakage, detector, detector_path):
    """(report, per-query results): the retrieval and vote metrics, provenance, per class, branch
    shares, OOD scores, abstention and the patient-bootstrap intervals."""
    classes = query_set.classes
    groups = {}
    if not args.keep_same_patient:
        groups["query_groups"] = query_set.patients
        if gallery_set is not None:
            groups["gallery_groups"] = gallery_set.patients
    rerank = cli.rerank_from_args(args)
    metrics, per_query = evaluate_lists(args, inputs, query_set, gallery_set, embedded, vote_ks, groups, rerank)
    num_gallery = len(query_set) if gallery_set is None else len(gallery_set)
    report = {"checkpoint": str(args.resume), "model": config["name"],
              "embedding_dim": config["embedding_dim"], "classes": classes,
              "num_queries": len(query_set), "num_gallery": num_gallery, "protocol": embedded.protocol,
              **metrics, "same_patient_excluded": not args.keep_same_patient, "inputs": inputs}
    ckpt_args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    report["provenance"] = {
        "checkpoint_epoch": checkpoint.get("epoch"), "best_epoch": checkpoint.get("best_epoch"),
        "selected_by": checkpoint.get("selection"), "seed": ckpt_args.get("seed"),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "versions": library_versions()}
    report["lists"] = {split.name: splits.provenance(split) for split in lists}
    report["leakage"] = leakage
    if not query_set.multilabel:  # per finding instead: metrics["per_finding"]
        report["per_class"] = report_stats.per_class(per_query, classes, query_set.patients)
    if embedded.query_features:  # mean over the queries and their top-1 neighbour (the report contract)
        report["branch_attribution"] = mean_branch_shares(
            model, embedded.query_features[0], per_query["top_indices"][:, 0], embedded.ranked_against,
            embedded.gallery_features[0])
    ood_scores = None
    if detector is not None:
        scores = detector.scores(embedded.query)
        flags = detector.flags(embedded.query, scores)
        ood_scores = {name: np.asarray(value) for name, value in scores.items()}
        report["ood"] = {"detector": str(detector_path),
                         "tpr": detector.tpr,
                         "thresholds": detector.thresholds,
                         "flagged_count": {name: int(flag.sum()) for name, flag in flags.items()},
                         "flagged_share": {name: float(flag.mean()) for name, flag in flags.items()},
                         "queries": [{"path": str(path), **{name: float(scores[name][i]) for name in scores},
                                      "flagged": {name: bool(flags[name][i]) for name in flags}}
                                     for i, path in enumerate(query_set.paths)]}
    report["abstention"] = report_stats.abstention(per_query, args.vote_k, args.abstain_below, ood_scores)
    if rerank.active:
        report["rerank"] = rerank_report(args, inputs, query_set, gallery_set, embedded, vote_ks, groups, rerank,
                                         per_query)
    if args.bootstrap:
        report["confidence_intervals"] = report_stats.bootstrap(per_query, query_set.patients, args.bootstrap,
                                                                args.bootstrap_seed)
    return report, per_query


def evaluate_lists(args, inputs, query_set, gallery_set, embedded, vote_ks, groups, rerank=None):
    """(metrics, per-query values): the retrieval and vote numbers, and for multi-label lists the
    retrieval numbers by finding relevance (the votes stay over the finding combinations)."""
    try:
        metrics, per_query = evaluate_retrieval(embedded.query, embedded.query_labels, embedded.gallery,
                                                embedded.gallery_labels, ks=KS, vote_ks=vote_ks,
                                                num_classes=len(query_set.classes), return_per_query=True,
                                                rerank=rerank, **groups)
        if query_set.multilabel:
            multilabel_metrics, multilabel_per_query = score_findings(args, query_set, gallery_set, embedded,
                                                                      vote_ks, groups, rerank)
            metrics = {**metrics, **multilabel_metrics, "classification_over": "finding combinations"}
            per_query = {**per_query, **multilabel_per_query}
    except ValueError as error:  # e.g. a patient holding nearly the whole list
        raise UserError(f"{inputs['test_image_list']['value']}: {error}") from error
    return metrics, per_query


def rerank_report(args, inputs, query_set, gallery_set, embedded, vote_ks, groups, rerank, per_query):
    """The re-ranking's parameters and its paired patient-bootstrap difference from the plain
    ranking of the same embeddings (--bootstrap resamples, 1000 when not given)."""
    _, plain = evaluate_lists(args, inputs, query_set, gallery_set, embedded, vote_ks, groups)
    comparison = report_stats.paired_comparison(per_query, plain, query_set.patients, args.bootstrap or 1000,
                                                args.bootstrap_seed)
    return {**rerank.describe(), "vs_plain": comparison}


def score_findings(args, query_set, gallery_set, embedded, vote_ks, groups, rerank=None):
    """(metrics, per-query values) of evaluate_multilabel over the lists' findings."""
    findings = eval_lists.lists_findings(query_set, gallery_set)
    tables = {"query_findings": query_set.combination_matrix(findings)[embedded.query_labels.cpu()]}
    if gallery_set is not None:
        tables["gallery_emb"] = embedded.gallery
        tables["gallery_findings"] = gallery_set.combination_matrix(findings)[embedded.gallery_labels.cpu()]
    metrics, per_query = evaluate_multilabel(embedded.query, ks=KS, knn_ks=vote_ks, relevance=args.relevance,
                                             finding_names=findings, return_per_query=True, rerank=rerank,
                                             **tables, **groups)
    return {**metrics, "findings": findings}, per_query


def write_outputs(args, checkpoint, config, report, per_query, query_set, gallery_set, embedded):
    """The report, the neighbours file, the figures and the embeddings (.npz)."""
    classes, protocol = query_set.classes, embedded.protocol
    checkpoint_path = Path(args.resume)
    report_path = Path(args.report or checkpoint_path.with_name(checkpoint_path.stem + "_report.json"))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    written = {"report": report_path}
    if args.neighbours > 0:
        k = min(args.neighbours, per_query["top_indices"].shape[1])
        neighbours = neighbour_records(per_query, embedded.query, embedded.ranked_against, query_set,
                                       gallery_set or query_set, classes, args.vote_k, k)
        for record, scored in zip(neighbours, report.get("ood", {}).get("queries", [])):
            record["ood"] = {name: value for name, value in scored.items() if name != "path"}
        written["neighbours"] = report_path.with_name(report_path.stem + "_neighbours.json")
        write_json(written["neighbours"], {"protocol": protocol, "k": k, "vote_k": args.vote_k,
                                           "same_patient_excluded": not args.keep_same_patient,
                                           "queries": neighbours})
    if args.plots:
        from cxr import plots  # here: matplotlib only when figures are asked for

        prefix = report_path.with_name(report_path.stem)
        matrix = report["classification"][str(args.vote_k)]["confusion_matrix"]
        written["confusion matrix"] = plots.confusion_matrix(
            matrix, classes, f"{prefix}_confusion.png",
            title=f"{config['name']}: majority vote, k = {args.vote_k} ({protocol})")
        written["embedding map"] = plots.embedding_map(
            embedded.query.cpu().numpy(), embedded.query_labels.cpu().numpy(), classes,
            f"{prefix}_embedding_map.png", args.map, title=f"{config['name']}: {len(query_set)} test embeddings "
            f"({'PCA' if args.map == 'pca' else 't-SNE'})")
        written["risk-coverage"] = plots.risk_coverage(report["abstention"], f"{prefix}_risk_coverage.png")
    if args.html:  # written after the report (below), so a failed page loses no number
        written["page"] = report_path.with_suffix(".html")
    report["files"] = {name: str(path) for name, path in written.items() if name != "report"}
    npz_path = embeddings_path(args, checkpoint_path, query_set, gallery_set)
    report["files"]["embeddings"] = str(npz_path)
    write_json(report_path, report)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    epoch = -1 if checkpoint.get("epoch") is None else checkpoint["epoch"]
    arrays = {"query_embeddings": embedded.query.cpu().numpy(),
              "query_labels": embedded.query_labels.cpu().numpy(),
              "query_paths": np.array([str(p) for p in query_set.paths]),
              "query_patients": np.array([str(p) for p in query_set.patients]), "classes": np.array(classes),
              "protocol": np.array(protocol), "checkpoint": np.array(str(args.resume)),
              "model": np.array(config["name"]), "epoch": np.array(epoch)}
    if query_set.multilabel:  # what test.py --compare scores multi-label lists by
        findings = report["findings"]
        arrays.update(findings=np.array(findings), relevance=np.array(args.relevance),
                      query_findings=query_set.combination_matrix(findings)[embedded.query_labels.cpu()].numpy())
        if gallery_set is not None:
            arrays["gallery_findings"] = gallery_set.combination_matrix(findings)[embedded.gallery_labels.cpu()].numpy()
    if gallery_set is not None:
        arrays.update(gallery_embeddings=embedded.gallery.cpu().numpy(),
                      gallery_labels=embedded.gallery_labels.cpu().numpy(),
                      gallery_paths=np.array([str(p) for p in gallery_set.paths]),
                      gallery_patients=np.array([str(p) for p in gallery_set.patients]))
    np.savez(npz_path, **arrays)
    if args.html:
        write_html(args, report_path, report, per_query, query_set, gallery_set, embedded, written)
    print(f"\nreport: {report_path}\nembeddings: {npz_path}")
    for name, path in written.items():
        if name != "report":
            print(f"{name}: {path}")


if __name__ == "__main__":
    cli.run_cli(lambda: main(get_args_parser().parse_args()))
