"""Retrieval for real use: index a labelled database once, then query it with new radiographs.

Index (resumable: re-running the same command skips the chunks already written):
    python retrieve.py index --resume CKPT --image-list LIST --dataset-dir DIR \
        [--dataset covid|csv|folder] --out gallery.index [--dtype float16] [--append]
Query (image files, and/or a labelled list read as `index` reads its list):
    python retrieve.py query --index gallery.index --resume CKPT [IMG ...] \
        [--image-list LIST [--dataset-dir DIR] [--dataset covid|csv|folder]] --topk 10 \
        [--ood | --no-ood] [--explain] --out OUTDIR
On the demo (after `make demo`):
    python retrieve.py index --resume runs/demo/<name>_best_ckpt.pth --dataset demo \
        --image-list data/demo/train_split.txt --dataset-dir data/demo/train --out runs/demo/gallery.index
    python retrieve.py query --index runs/demo/gallery.index --resume runs/demo/<name>_best_ckpt.pth \
        data/demo/test/phantom_test_00000.png --out runs/demo/query

An index is a folder: `manifest.json` (model config, fingerprint of the config and weights,
class names, storage dtype, the chunk files and the image folder of each) and `chunk_NNNNN.npz`
files of up to --chunk-size images each (embeddings, label ids, paths relative to that folder),
every file written atomically. `--append` embeds only the images of the list that the index does not hold yet.
A checkpoint whose fingerprint differs from the index's is refused.

The search is exact: the gallery is scanned in chunks (one matrix product per chunk, a running
top-k), so memory stays near the gallery's own size. Ties rank by gallery index, as in test.py.
A query writes `OUTDIR/results.json` ({"queries": [{"query", "label"?, "correct"?, "neighbours":
[{"path", "label", "similarity"}], "vote", "votes", "ood"?, "explanation"?, "contact_sheet"}],
"ood"?, "labelled"?}; neighbour paths are the image files as indexed; "label" and "correct" (vote
== label) for queries of --image-list; the top-level "ood" and "labelled" count the flagged and
the correctly voted queries), a contact sheet `OUTDIR/<NNNN>_<query stem>.png` per query
(cxr/contact_sheet.py; with --explain, each tile carries a gradnorm heat map of the branch layers,
fused by branch share: cxr/gradcam.py), and prints a table.
The OOD guard is on by default where ood.py saved a detector beside the checkpoint
(<checkpoint stem>_ood.pth): see cxr/ood_guard.py. For galleries of many millions, where the
exact scan (linear in the gallery) is too slow: `index --faiss-ivf NLIST` adds an approximate
faiss inverted-file index and `query --search faiss --nprobe N` uses it (faiss is optional:
`pip install faiss-cpu`).
`query --rerank aqe|dba|kreciprocal` re-ranks the exact scan of the whole index (cxr/reranking.py;
dba and kreciprocal first find every indexed image's neighbours, quadratic in the index's size:
see BENCHMARKS.md); each neighbour's "similarity" stays the cosine, its "rerank_score" ranked it.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxr import (
    cli,
    contact_sheet,
    gallery_index,
    gradcam,
    html_pages,
    image_cache,
    ood_detector,
    ood_guard,
    progress,
    regions,
    run_data,
)
from cxr import ontology as onto
from cxr.atomic_files import write_json
from cxr.checkpoints import data_bit_depth, load_trained_model
from cxr.embeddings import class_prototypes, extract_embeddings
from cxr.errors import UserError
from cxr.gradcam import RetrievalGradCAM, default_layers
from cxr.images import load_image
from cxr.masks import read_masks
from cxr.presets import LIST_FORMAT
from cxr.reranking import search_reranked
from cxr.runtime import Runtime, autocast, refuse_distributed, resolve_amp, setup_runtime
from cxr.search import search
from dataset import DatasetError, ImageListDataset, build_transform


# ---------------------------------------------------------------------- index command
def build_index(args):
    refuse_distributed("retrieve.py")
    device = setup_runtime(args.device).device
    model, checkpoint, fingerprint = load_trained_model(args.resume, device)
    config = checkpoint["model_config"]
    out = Path(args.out)
    dataset = ImageListDataset(args.dataset_dir, args.image_list, LIST_FORMAT[args.dataset],
                               transform=build_transform(config["img_size"], train=False),
                               list_options=run_data.given_list_options(args, {}, "train"),
                               bit_depth=data_bit_depth(checkpoint) or "auto",
                               folder_flag="--dataset-dir (the folder the list's paths are relative to)")
    run_data.use_cache([dataset], args.cache_dir, config["img_size"])
    # Absolute, so the index answers from any working directory; compared normalised, so
    # `data/x` and `./data/x` name the same folder.
    root = os.path.abspath(dataset.image_root)
    wanted = [os.path.normpath(os.path.join(root, os.path.relpath(p, dataset.image_root)))
              for p in dataset.paths]
    if (out / gallery_index.MANIFEST).is_file():
        manifest = gallery_index.read_manifest(out)
        if manifest["fingerprint"] != fingerprint:
            raise SystemExit(f"error: {out} was built with another model (fingerprint "
                             f"{manifest['fingerprint'][:12]}, {args.resume}: {fingerprint[:12]}); "
                             "choose another --out for this checkpoint")
        if args.dtype and args.dtype != manifest["dtype"]:
            raise SystemExit(f"error: {out} stores {manifest['dtype']} embeddings; drop --dtype "
                             "or build a new index")
        done = [os.path.normpath(os.path.join(os.path.abspath(chunk["root"]), p))
                for chunk in manifest["chunks"] for p in gallery_index.chunk_paths(out / chunk["file"])]
        if not args.append and done != wanted[:len(done)]:
            raise SystemExit(f"error: {out} already holds other images than the start of "
                             f"{args.image_list}; add images with --append, or choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": gallery_index.INDEX_FORMAT, "version": gallery_index.INDEX_VERSION,
                    "fingerprint": fingerprint,
                    "bit_depth": dataset.bit_depth,  # what queries are scaled by when the checkpoint has none
                    "model_config": config, "checkpoint": str(args.resume), "classes": [],
                    "dtype": args.dtype or "float32", "chunks": []}
        done = []
    classes = manifest["classes"]
    for name in dataset.classes:  # label names of the index; an appended list may add some
        if name not in classes:
            classes.append(name)
    label_ids = np.array([classes.index(dataset.classes[t]) for t in dataset.targets.tolist()])
    held = set(done)
    todo = [i for i, path in enumerate(wanted) if path not in held]
    print(f"index {out}: {len(done)} images already in, {len(todo)} to embed", flush=True)
    runtime = Runtime(device)
    amp = resolve_amp("auto", str(device))
    for start in range(0, len(todo), args.chunk_size):
        part = todo[start:start + args.chunk_size]
        loader = DataLoader(dataset.subset(part, dataset.transform), batch_size=args.batch_size,
                            num_workers=args.workers)
        embeddings, _ = extract_embeddings(model, loader, runtime, amp)
        file = f"chunk_{len(manifest['chunks']):05d}.npz"
        relative = [str(dataset.paths[i].relative_to(dataset.image_root)) for i in part]
        gallery_index.write_npz(out / file, embeddings=embeddings.cpu().numpy().astype(manifest["dtype"]),
                   labels=label_ids[part], paths=np.array(relative))
        manifest["chunks"].append({"file": file, "count": len(part), "root": root})
        write_json(out / gallery_index.MANIFEST, manifest)  # after the chunk: a kill never lists a missing one
        print(f"  {start + len(part)}/{len(todo)} embedded", flush=True)
    total = sum(chunk["count"] for chunk in manifest["chunks"])
    if args.faiss_ivf:
        manifest["faiss"] = gallery_index.build_faiss_index(out, args.faiss_ivf)
    elif manifest.get("faiss", {}).get("count", total) != total:
        print(f"warning: {out}'s faiss index holds {manifest['faiss']['count']} of {total} images and "
              "is dropped; rebuild it with --faiss-ivf", file=sys.stderr)
        del manifest["faiss"]
    write_json(out / gallery_index.MANIFEST, manifest)
    print(f"index {out}: {total} images, {len(classes)} classes, {manifest['dtype']}")
    return manifest


# ---------------------------------------------------------------------- query command
def embed_images(model, paths, img_size, device, skip_bad, amp="none", bit_depth=None):
    """Embeddings of the readable images and the indices (into `paths`) of those kept;
    unreadable ones are an error naming them, or skipped (with a message) when skip_bad.
    16-bit files are scaled by `bit_depth`, the training data's."""
    transform = build_transform(img_size, train=False)
    tensors, kept, bad = [], [], []
    for i, path in enumerate(paths):
        try:
            tensors.append(transform(load_image(path, bit_depth)))
            kept.append(i)
        except (OSError, ValueError, SyntaxError) as error:
            bad.append(f"{path}: {error}")
    if bad and not skip_bad:
        raise SystemExit("error: cannot read " + "; ".join(bad) + ". Fix or drop these images, or "
                         "pass --skip-bad-images to query the others")
    for message in bad:
        print(f"skipped unreadable image {message}", file=sys.stderr)
    if not tensors:
        raise SystemExit("error: no readable query image")
    with torch.inference_mode(), autocast(device, amp):  # as the index was embedded
        embeddings = torch.cat([model(torch.stack(tensors[i:i + 64]).to(device)).float()
                                for i in range(0, len(tensors), 64)])
    return embeddings, kept


def query_inputs(args, classes):
    """([query image paths], [their labels]): the images named on the command line (label None),
    then those of --image-list with the list's labels, read as `index` reads its list."""
    paths, labels = list(args.images), [None] * len(args.images)
    if args.image_list or args.dataset_dir:
        if args.dataset == "folder" and not args.dataset_dir:
            raise UserError("--dataset folder reads the queries' labels from the sub-folders of "
                                  "--dataset-dir; give it")
        if args.dataset != "folder" and not args.image_list:
            raise UserError("--dataset-dir is the folder of an --image-list's images; give the "
                                  "list too (or --dataset folder for a folder per label)")
        root = args.dataset_dir or Path(args.image_list).parent
        listed = ImageListDataset(root, args.image_list, LIST_FORMAT[args.dataset], bit_depth=None,
                                  list_options=run_data.given_list_options(args, {}, "test"),
                                  folder_flag="--dataset-dir (the folder the query list's paths are relative to; "
                                  "default: the list's own folder)")
        paths += [str(path) for path in listed.paths]
        labels += [listed.classes[t] for t in listed.targets.tolist()]
        unknown = sorted(set(listed.classes) - set(classes))
        if unknown:  # a label spelt otherwise than the index's can never equal a vote
            print(f"warning: {listed.source} labels {', '.join(unknown)}, which the index does not "
                  f"hold ({', '.join(classes)}): those queries' votes count as wrong", file=sys.stderr)
    if not paths:
        raise UserError("no query images: name image files, or give a labelled --image-list")
    return paths, labels


def query(args):
    refuse_distributed("retrieve.py")
    if args.topk < 1:
        raise SystemExit(f"error: --topk {args.topk}: give at least 1 neighbour")
    if args.mask_dir and not args.explain:
        raise SystemExit("error: --mask-dir gives the masks the ontology reads with the heat maps: add --explain "
                         "(or drop --mask-dir)")
    rerank = cli.rerank_from_args(args)
    if rerank.active and args.search == "faiss":
        raise UserError(f"--rerank {args.rerank} re-ranks the exact scan of the whole index; drop "
                        "--search faiss (or --rerank)")
    device = setup_runtime(args.device).device
    manifest, gallery, gallery_labels, gallery_paths = gallery_index.load_index(args.index)
    classes = manifest["classes"]
    query_paths, query_labels = query_inputs(args, classes)  # list errors before loading the model
    model, checkpoint, fingerprint = load_trained_model(args.resume, device)
    if manifest["fingerprint"] != fingerprint:
        raise SystemExit(f"error: {args.resume} is not the model that built {args.index} "
                         f"(fingerprints {fingerprint[:12]} vs {manifest['fingerprint'][:12]}); "
                         "query with the index's checkpoint, or build an index for this one")
    detector, detector_path = ood_guard.choose(args.ood, args.resume, fingerprint, args.ood_detector,
                                               log=lambda line: print(line, file=sys.stderr))
    bit_depth = data_bit_depth(checkpoint) or manifest.get("bit_depth")
    embeddings, kept = embed_images(model, query_paths, checkpoint["model_config"]["img_size"], device,
                                    args.skip_bad_images, resolve_amp("auto", str(device)), bit_depth)
    rerank_scores = None
    if rerank.active:  # an exact second pass over the whole index (cxr/reranking.py)
        rerank_scores, similarities, indices = search_reranked(embeddings, torch.from_numpy(gallery).to(device),
                                                               args.topk, rerank)
    elif args.search == "faiss":
        similarities, indices = gallery_index.faiss_search(args.index, manifest, embeddings,
                                                           min(args.topk, len(gallery)), args.nprobe)
    else:
        similarities, indices = search(embeddings, torch.from_numpy(gallery).to(device), args.topk)
    if detector is not None:
        scores = detector.scores(embeddings)
        flags = detector.flags(embeddings, scores)
    cam = None
    if args.explain:
        cam = RetrievalGradCAM(model, default_layers(model))
        transform = build_transform(checkpoint["model_config"]["img_size"], train=False)
        prototypes = class_prototypes(gallery, gallery_labels, len(classes)).to(device)
        ontology = onto.load_ontology()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, maps_by_query = [], {}
    for q, (path, label) in enumerate((query_paths[i], query_labels[i]) for i in kept):
        neighbours = [{"path": gallery_paths[i], "label": classes[gallery_labels[i]],
                       "similarity": round(float(s), 6)}
                      for s, i in zip(similarities[q].tolist(), indices[q].tolist()) if i >= 0]
        if rerank_scores is not None:  # ranked by the re-ranked score; "similarity" stays the cosine
            for n, score in zip(neighbours, rerank_scores[q].tolist()):
                n["rerank_score"] = round(float(score), 6)
        votes = {}
        for n in neighbours:  # counts in order of first appearance: a tie goes to the better ranked
            votes[n["label"]] = votes.get(n["label"], 0) + 1
        vote = max(votes, key=votes.get) if votes else None
        record = {"query": str(path), "neighbours": neighbours, "vote": vote, "votes": votes}
        if label is not None:
            record.update(label=label, correct=vote == label)
        if detector is not None:
            record["ood"] = {"flagged": bool(flags[args.ood_score][q]), "score": args.ood_score,
                             "value": float(scores[args.ood_score][q]),
                             "threshold": detector.thresholds[args.ood_score]}
        maps = None
        if cam is not None and neighbours:  # the query towards its vote's prototype, each neighbour towards the query
            # One batch, so the hybrid's branch shares (which weight the fused maps) are measured
            # against the mean features of the images shown: the index keeps no per-branch ones.
            targets = torch.cat([prototypes[classes.index(vote)][None],
                                 embeddings[q].expand(len(neighbours), -1)])
            maps = [m for _, m in gradcam.heatmaps(cam, transform, [path] + [n["path"] for n in neighbours],
                                                   targets, device, bit_depth=bit_depth)]
            peak = np.unravel_index(int(maps[0].argmax()), maps[0].shape)
            record["explanation"] = {"target": f"mean index embedding of {vote}", "method": cam.method,
                                     "layers": cam.layers, "peak_xy": [int(peak[1]), int(peak[0])]}
            # The ontology's reading of the query's map: with --mask-dir's lung and heart masks every
            # rule can run; without them only those that need none, and the sentences say so.
            masks = read_masks(args.mask_dir, Path(path).name) if args.mask_dir else {}
            stats = regions.region_statistics(maps[0], masks.get("lungs"), masks.get("heart"))
            reasoning = onto.reason(ontology, stats, vote)
            record.update(rules_fired=reasoning["rules_fired"], sentences=reasoning["sentences"])
        sheet = out / f"{q:04d}_{Path(path).stem}.png"  # numbered: equal names from two folders
        contact_sheet.draw(path, record, sheet, maps=maps, bit_depth=bit_depth)
        record["contact_sheet"] = str(sheet)
        results.append(record)
        if maps is not None:
            maps_by_query[q] = maps
    summary = {"index": str(args.index), "checkpoint": str(args.resume), "topk": args.topk,
               "rerank": rerank.describe()}
    if detector is not None:  # the count a reader needs before trusting any vote
        summary["ood"] = {"detector": str(detector_path), "score": args.ood_score,
                          "flagged": sum(r["ood"]["flagged"] for r in results), "queries": len(results)}
    labelled = [r for r in results if "label" in r]
    if labelled:
        summary["labelled"] = {"queries": len(labelled), "correct": sum(r["correct"] for r in labelled)}
    write_json(out / "results.json", {**summary, "queries": results})
    page = html_pages.retrieval_page(out, summary, results, maps_by_query, bit_depth)
    print_results(results, summary)
    print(f"\nresults: {out / 'results.json'}; contact sheets in {out}; page: {page}")
    return results


def print_results(results, summary=None):
    for record in results:
        votes = ", ".join(f"{label} {count}" for label, count in record["votes"].items())
        truth = ""
        if "label" in record:
            truth = f"  label {record['label']}: {'right' if record['correct'] else 'WRONG'}"
        flag = ""
        if "ood" in record:
            flag = "  OUT OF DISTRIBUTION" if record["ood"]["flagged"] else "  in distribution"
        print(f"\n{record['query']}: vote {record['vote']} ({votes}){truth}{flag}")
        print(f"  {'rank':>4}  {'similarity':>10}  {'label':<14} path")
        for rank, n in enumerate(record["neighbours"], start=1):
            print(f"  {rank:>4}  {n['similarity']:>10.4f}  {n['label']:<14} {n['path']}")
    summary = summary or {}
    if "labelled" in summary:
        print(f"\nvote right for {summary['labelled']['correct']} of {summary['labelled']['queries']} "
              "labelled queries")
    if "ood" in summary:
        o = summary["ood"]
        print(f"\n{o['flagged']} of {o['queries']} queries out of distribution ({o['score']} score of "
              f"{o['detector']}){': do not trust their votes' if o['flagged'] else ''}")


# ---------------------------------------------------------------------- command line
def get_args_parser():
    parser = argparse.ArgumentParser(description="Index a labelled database; query it with radiographs")
    cli.add_debug_flag(parser)  # run_cli acts on it wherever it stands; here for --help
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed a labelled image list into an index folder")
    cli.add_resume_flag(index, "train.py checkpoint")
    index.add_argument("--image-list", help="list of the database images (not needed for --dataset folder)")
    cli.add_dataset_dir_flag(index, "the folder the list's paths are relative to (not train.py's folder of train/ "
                         "and test/)", required=True)
    cli.add_dataset_flag(index, "list format, as in train.py", default="covid")
    cli.add_public_list_flags(index, mimic_split="train")
    index.add_argument("--out", required=True, help="index folder (created; re-run to resume)")
    index.add_argument("--append", action="store_true", help="add the list's images the index lacks")
    index.add_argument("--dtype", choices=("float32", "float16"),
                       help="storage of the embeddings of a new index (default float32); float16 "
                       "halves the size, ranks may differ from test.py's where similarities differ "
                       "by less than ~1e-3")
    index.add_argument("--chunk-size", type=int, default=1024, help="images per chunk file")
    index.add_argument("--faiss-ivf", type=int, metavar="NLIST",
                       help="also build an approximate faiss IVF index with NLIST clusters (needs "
                            "faiss; about sqrt(N) to 4 sqrt(N) clusters for N images)")
    index.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    cli.add_workers_flag(index, min(4, os.cpu_count() or 1))
    image_cache.add_argument(index)
    cli.add_device_flag(index)
    cli.add_progress_flag(index)
    ask = commands.add_parser("query", help="rank the index's images for each query image")
    ask.add_argument("images", nargs="*", help="query image files (unlabelled)")
    ask.add_argument("--image-list", help="a labelled list of query images (any --dataset format): "
                     "results and contact sheets show each query's label and whether the vote is right")
    cli.add_dataset_dir_flag(ask, "the folder the list's paths are relative to (default: the list's folder; for "
                         "--dataset folder, the folder per label)")
    cli.add_dataset_flag(ask, "list format, as in index", default="covid")
    cli.add_public_list_flags(ask, mimic_split="test")
    ask.add_argument("--index", required=True, help="index folder")
    cli.add_resume_flag(ask, "the checkpoint that built the index")
    ask.add_argument("--topk", type=int, default=10, help="neighbours per query")
    ask.add_argument("--out", required=True, help="folder for results.json and the contact sheets")
    ask.add_argument("--search", choices=("exact", "faiss"), default="exact",
                     help="exact chunked scan, or the index's faiss IVF index (approximate)")
    ask.add_argument("--nprobe", type=int, default=16, help="clusters a faiss query visits")
    cli.add_rerank_flags(ask)
    ask.add_argument("--ood", action=argparse.BooleanOptionalAction,
                     help="flag queries the OOD detector of ood.py rejects; on by default when the "
                     "detector is there, --ood makes a missing or stale one an error, --no-ood turns it off")
    ask.add_argument("--explain", action="store_true",
                     help="heat maps on the contact sheet and the page (cxr/gradcam.py's gradnorm maps of the branch "
                          "layers, fused by branch share; explain.py's integrated gradients need gallery images): the "
                          "query's towards "
                          "its vote's mean embedding, each neighbour's towards the query; the ontology's sentences "
                          "read the query's map")
    ask.add_argument("--mask-dir", help="with --explain: lungs/ and heart/ mask PNGs named like the query files "
                     "(as demo_data.py and chexmask.py to-png write them), so every ontology rule can run; the "
                     "rules read the gradnorm map of the whole film, where explain.py reads its integrated "
                     "gradients, so the two may say different things of one film")
    ask.add_argument("--ood-detector", help="detector file, required when given (default "
                     "<checkpoint stem>_ood.pth, used when it exists)")
    ask.add_argument("--ood-score", default="mahalanobis", choices=ood_detector.SCORES, help="score that flags")
    ask.add_argument("--skip-bad-images", action="store_true", help="query the readable images only")
    cli.add_device_flag(ask)
    cli.add_progress_flag(ask)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    progress.set_mode(args.progress)
    try:
        return build_index(args) if args.command == "index" else query(args)
    except (gallery_index.IndexFileError, DatasetError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    cli.run_cli(main)
