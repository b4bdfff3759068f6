"""MODEL_CARD.md, written by export.py beside the exported weights from what the checkpoint and
its reports hold: the architecture and its size, the training lists, the recipe, the validation
numbers that chose the checkpoint, the test numbers with their intervals and per class, the
branch shares, the OOD guard's thresholds, the intended use and the limits. Every number is
copied from a file (named in the card); what no file holds is said to be missing, never guessed.
"""
from pathlib import Path

RECIPE_KEYS = ("recipe", "mining", "margin", "soft_margin", "id_loss_weight", "branch_loss_weight", "neck",
               "optimizer", "lr", "schedule", "epochs", "labels_per_batch", "samples_per_label", "amp",
               "pretrained", "seed", "val_fraction", "shuffle_labels")


def _number(value, digits=1):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _interval(intervals, *keys):
    node = intervals or {}
    for key in keys:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return f" [{node['low']:.1f}, {node['high']:.1f}]" if node.get("low") is not None else ""


def _lists_section(checkpoint, report):
    args = checkpoint.get("args") or {}
    lines = ["## Training data", ""]
    if args.get("dataset") == "demo":
        lines += ["**Synthetic phantoms.** This model was trained on the repository's generated chest X-ray "
                  "phantoms (`--dataset demo`), not on radiographs of patients. It demonstrates the code; it has "
                  "learned nothing about real films and must not be used on them.", ""]
    lists = (report or {}).get("lists") or {}
    if lists:
        lines += ["| list | file | SHA-256 | images | patients | images per class |", "|---|---|---|---|---|---|"]
        for name, entry in lists.items():
            per_class = ", ".join(f"{label} {c['images']}" for label, c in (entry.get("per_class") or {}).items())
            lines.append(f"| {name} | `{entry.get('list', '')}` | `{str(entry.get('sha256', ''))[:16]}…` "
                         f"| {entry.get('images', 'n/a')} | {entry.get('patients', 'n/a')} | {per_class} |")
        lines.append("")
    else:
        lines += [f"Training list: `{args.get('train_image_list')}` under `{args.get('dataset_dir')}` "
                  f"(format `{args.get('dataset')}`); no test.py report with the lists' digests and counts "
                  "was given (export.py --report).", ""]
    lines += [f"The best checkpoint was chosen by `{checkpoint.get('selection', 'n/a')}` on the images of digest "
              f"`{str(checkpoint.get('split', 'n/a'))[:16]}…`; the test list never chose anything.", ""]
    return lines


def model_card(checkpoint, checkpoint_path, parameters, report=None, report_path=None, detector=None,
               detector_path=None, exported=()):
    """The card's markdown text."""
    config, args = checkpoint["model_config"], checkpoint.get("args") or {}
    classes = checkpoint.get("classes") or []
    lines = [f"# Model card: {config['name']}, embedding {config['embedding_dim']}", ""]
    if args.get("dataset") == "demo":
        lines += ["> **Warning: trained on synthetic phantoms, not on patients' radiographs.** For trying the code "
                  "only; not for any clinical or research conclusion about real chest X-rays.", ""]
    lines += ["## Model", "",
              f"- architecture: `{config['name']}` (ConvNeXt branch `{config.get('convnext_name')}`, ViT branch "
              f"`{config.get('vit_name')}`), {config['img_size']} px input, {config['embedding_dim']}-d L2-normalised "
              "embedding; similarity is the dot product",
              "- configuration: " + ", ".join(f"{k} `{v}`" for k, v in config.items()
                                                if k not in ("name", "img_size", "embedding_dim")),
              f"- parameters: {parameters / 1e6:.1f} M",
              f"- classes ({len(classes)}): {', '.join(classes)}",
              f"- bit depth of the 16-bit training films: {checkpoint.get('bit_depth') or 'none (8-bit data)'}",
              f"- from: `{checkpoint_path}` (epoch {checkpoint.get('epoch')}, best epoch "
              f"{checkpoint.get('best_epoch')})",
              *(f"- exported: `{Path(p).name}`" for p in exported), ""]
    lines += _lists_section(checkpoint, report)
    lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {args[key]} |" for key in RECIPE_KEYS if key in args]
    if args.get("shuffle_labels"):
        lines += ["", "**Trained on permuted labels** (`--shuffle-labels`, the data-randomisation check): "
                  "a floor to compare with, not a model to use."]
    lines += ["", "## Results", ""]
    metrics = checkpoint.get("metrics") or {}
    split = "val" if any(k.startswith("val_") for k in metrics) else "test"
    lines += [f"Selection ({split} split, the checkpoint's own epoch record): "
              f"R@1 {_number(metrics.get(f'{split}_R@1'))}, mAP {_number(metrics.get(f'{split}_mAP'))}, "
              f"mP@1 {_number(metrics.get(f'{split}_mP@1'))} (percent).", ""]
    if report:
        ci = report.get("confidence_intervals")
        lines += [f"Test ({report['protocol']}, {report['num_queries']} queries, images of a query's own patient "
                  f"{'left out' if report.get('same_patient_excluded') else 'kept'}; `{report_path}`"
                  + ("; 95% patient-bootstrap intervals" if ci
                     else "; no intervals: test.py --bootstrap 1000 gives them")
                  + "):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| R@{k} | {v:.1f}{_interval(ci, 'recall_at_k', k)} |" for k, v in report["recall_at_k"].items()]
        lines.append(f"| mAP | {report['map']:.1f}{_interval(ci, 'map')} |")
        lines += [f"| mP@{k} | {v:.1f}{_interval(ci, 'precision_at_k', k)} |"
                  for k, v in report["precision_at_k"].items()]
        vote_k = str((report.get("abstention") or {}).get("vote_k", "10"))
        if vote_k in report["classification"]:
            accuracy = report["classification"][vote_k]["accuracy"]
            interval = _interval(ci, "classification", vote_k, "accuracy")
            lines.append(f"| vote accuracy, k = {vote_k} | {accuracy:.1f}{interval} |")
        if "per_class" in report:
            lines += ["", "| class | queries | R@1 | AP |", "|---|---|---|---|"]
            lines += [f"| {name} | {c['queries']} | {c['recall_at_1']:.1f} | {c['ap']:.1f} |"
                      for name, c in report["per_class"]["classes"].items()]
        if "per_finding" in report:  # a multi-label list: relevance = a shared finding (or --relevance exact)
            lines += ["", f"Relevance: {report['relevance']}; MAP@R {report['map_at_r']:.1f}, R-precision "
                      f"{report['r_precision']:.1f}.", "", "| finding | queries | AP |", "|---|---|---|"]
            for name, row in report["per_finding"].items():
                ap = "n/a" if row["ap"] is None else f"{row['ap']:.1f}"
                lines.append(f"| {name} | {row['queries']} | {ap} |")
        lines.append("")
    else:
        lines += ["No test report was given (export.py --report REPORT.json, written by test.py): the card holds "
                  "no test numbers.", ""]
    shares = (report or {}).get("branch_attribution") or {
        b: metrics[f"{split}_{b}_share"] for b in ("convnext", "vit") if f"{split}_{b}_share" in metrics}
    if shares:
        lines += ["Each branch's share of the query-to-neighbour similarity: "
                  + ", ".join(f"{b} {v:.1f}%" for b, v in shares.items()), ""]
    lines += ["## Out-of-distribution guard", ""]
    if detector is not None:
        lines += [f"Detector `{detector_path}`, thresholds set to accept {detector.tpr:.0%} of held-out "
                  "in-distribution films (higher score = more out of distribution):", "",
                  "| score | threshold |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in detector.thresholds.items()]
        lines.append("")
    else:
        lines += ["No OOD detector was fitted for this checkpoint (ood.py): nothing flags films unlike the "
                  "training data.", ""]
    lines += ["## Intended use and limits", "",
              "- Intended: research on content-based retrieval of chest radiographs, ranking a labelled database "
              "by similarity to a query film, with explanations and an OOD flag to help a reader judge each answer.",
              "- Not a diagnostic device: the votes are neighbours' labels, not a diagnosis, and no clinical "
              "validation has been done.",
              "- Valid only for films like the training lists (view, scanner, population, label definitions); "
              "measure on your own data before relying on any number above.",
              f"- The model knows only these labels: {', '.join(classes)}; any other finding is out of its scope.",
              "- Numbers from one training run (one seed); see the repository's guide for the spread over seeds.", ""]
    return "\n".join(lines)
