"""Self-contained HTML pages a radiologist or a reviewer can scroll: retrieve.py query's
index.html (each query with its neighbours, similarities, labels, right/wrong, heat maps, the OOD
flag) and test.py --html's report.html (the metrics with their intervals, per class, the figures,
the queries with the lowest AP and their neighbours).

Every picture is a PNG in a folder beside the page, named relatively, so the folder can be zipped
and mailed: no server, no internet, no script, one inline style sheet. Every picture has an alt
text and a caption.
"""
import html
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from cxr.explain_figures import overlay
from cxr.images import load_image
from cxr.public_lists import shares_a_finding

THUMBNAIL = 192  # pixels of a film's picture on a page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-top: 1px solid #ccc; padding-top: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.films { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 200px; } figure img { width: 192px; height: 192px; border: 4px solid #ddd; }
figcaption { font-size: 0.8em; overflow-wrap: anywhere; }
.right img { border-color: #2e7d32; } .wrong img { border-color: #c62828; } .query img { border-color: #1565c0; }
.right .verdict { color: #2e7d32; font-weight: bold; } .wrong .verdict { color: #c62828; font-weight: bold; }
.ood { color: #c62828; font-weight: bold; } .note { color: #555; font-size: 0.9em; }
.figure-wide img { width: auto; max-width: 640px; height: auto; }
"""


def escape(value):
    return html.escape(str(value), quote=True)


def page(title, body):
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{escape(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def write_page(path, title, body):
    Path(path).write_text(page(title, body), encoding="utf-8")
    return Path(path)


def picture(source, folder, name, bit_depth=None, saliency=None):
    """A THUMBNAIL x THUMBNAIL PNG of the film at `source` (with its heat map when given) in
    `folder`, returned as a path relative to the folder's parent (the page's folder); None when
    the film cannot be read (moved or deleted since indexing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        image = load_image(source, bit_depth)
    except (OSError, ValueError):
        return None
    if saliency is not None:
        image = Image.fromarray(overlay(image, saliency))
    image.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR).save(folder / name)
    return f"{folder.name}/{name}"


def figure(src, alt, caption_html, css=""):
    if src is None:
        return (f"<figure class=\"{css}\"><figcaption><span class=\"ood\">film not readable</span><br>"
                f"{caption_html}</figcaption></figure>")
    return (f"<figure class=\"{css}\"><img src=\"{escape(quote(src))}\" alt=\"{escape(alt)}\">"
            f"<figcaption>{caption_html}</figcaption></figure>")


def table(header, rows, numeric=()):
    """An HTML table; columns whose index is in `numeric` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{escape(c)}</td>" if i in numeric else f"<td>{escape(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def neighbour_figures(neighbours, folder, prefix, query_label, bit_depth=None, maps=None):
    """The figures of a query's ranked neighbours: rank, label, similarity, patient and, for a
    labelled query, right (same label, or a finding in common) or wrong."""
    out = []
    for rank, n in enumerate(neighbours, start=1):
        src = picture(n["path"], folder, f"{prefix}_n{rank:02d}.png", bit_depth,
                      None if maps is None else maps[rank])
        verdict, css = "", ""
        if query_label is not None:
            right = shares_a_finding(n["label"], query_label)
            verdict, css = ("right" if right else "wrong"), ("right" if right else "wrong")
        patient = f"<br>patient {escape(n['patient'])}" if n.get("patient") is not None else ""
        caption = (f"#{rank} {escape(n['label'])} <span class=\"verdict\">{verdict}</span><br>"
                   f"similarity {n['similarity']:.3f}{patient}<br>{escape(Path(n['path']).name)}")
        out.append(figure(src, f"neighbour {rank}: {n['label']}, similarity {n['similarity']:.3f}"
                          + (f", {verdict}" if verdict else ""), caption, css))
    return out


def retrieval_page(out_dir, summary, results, maps_by_query=None, bit_depth=None):
    """retrieve.py query's index.html in out_dir, its pictures in out_dir/images."""
    out_dir = Path(out_dir)
    folder = out_dir / "images"
    sections = []
    head = [f"index {escape(summary['index'])}, checkpoint {escape(summary['checkpoint'])}, top {summary['topk']}"]
    if "labelled" in summary:
        head.append(f"vote right for {summary['labelled']['correct']} of {summary['labelled']['queries']} "
                    "labelled queries")
    if "ood" in summary:
        head.append(f"{summary['ood']['flagged']} of {summary['ood']['queries']} queries out of distribution "
                    f"({escape(summary['ood']['score'])} score)")
    for q, record in enumerate(results):
        maps = (maps_by_query or {}).get(q)
        label = record.get("label")
        src = picture(record["query"], folder, f"q{q:04d}.png", bit_depth, None if maps is None else maps[0])
        lines = [f"<b>query</b> {escape(Path(record['query']).name)}"]
        if label is not None:
            lines.append(f"label {escape(label)}")
        lines.append(f"vote {escape(record['vote'])}" + (f" ({'right' if record['correct'] else 'wrong'})"
                                                         if label is not None else ""))
        ood = record.get("ood")
        if ood is not None:
            state = "<span class=\"ood\">OUT OF DISTRIBUTION: do not trust the vote</span>" if ood["flagged"] \
                else "in distribution"
            lines.append(f"OOD {escape(ood['score'])} {ood['value']:.3f} (threshold {ood['threshold']:.3f}): {state}")
        if "explanation" in record:
            lines.append(f"heat maps: {escape(record['explanation']['method'])} towards the "
                         f"{escape(record['explanation']['target'])} (query), the query (neighbours)")
        films = [figure(src, f"query film {Path(record['query']).name}", "<br>".join(lines), "query")]
        films += neighbour_figures(record["neighbours"], folder, f"q{q:04d}", label, bit_depth, maps)
        sentences = record.get("sentences")
        said = "".join(f"<p>{escape(s)}</p>" for s in sentences) if sentences else (
            "<p class=\"note\">No ontology sentences: they read the heat map (query --explain); with lung "
            "and heart masks (explain.py --mask-dir or --chexmask) every rule can run.</p>")
        sections.append(f"<h2>Query {q + 1}: {escape(Path(record['query']).name)}</h2>\n"
                        f"<div class=\"films\">{''.join(films)}</div>\n{said}")
    body = "<p>" + "<br>".join(head) + "</p>\n" + "\n".join(sections)
    return write_page(out_dir / "index.html", "Retrieval results", body)


def metric_rows(report):
    """[(name, value, 95% interval or '')] of the report's headline numbers."""
    intervals = report.get("confidence_intervals") or {}

    def interval(*keys):
        node = intervals
        for key in keys:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return f"[{node['low']:.1f}, {node['high']:.1f}]" if node.get("low") is not None else ""
    rows = [(f"R@{k}", f"{v:.1f}", interval("recall_at_k", k)) for k, v in report["recall_at_k"].items()]
    rows.append(("mAP", f"{report['map']:.1f}", interval("map")))
    rows += [(f"mP@{k}", f"{v:.1f}", interval("precision_at_k", k)) for k, v in report["precision_at_k"].items()]
    rows += [(name, f"{report[key]:.1f}", interval(key)) for key, name in (("map_at_r", "MAP@R"),
                                                                          ("r_precision", "R-precision"))
             if key in report]
    rows += [(f"nDCG@{k} (Jaccard gains)", f"{v:.1f}", "") for k, v in report.get("ndcg_at_k", {}).items()]
    for k, scores in report["classification"].items():
        rows.append((f"vote accuracy, k = {k}", f"{scores['accuracy']:.1f}", interval("classification", k, "accuracy")))
        rows.append((f"vote macro F1, k = {k}", f"{scores['f1_macro']:.1f}", interval("classification", k, "f1_macro")))
    return rows


def report_page(report_path, report, figures, lowest, bit_depth=None):
    """test.py --html: report.html beside the report (`report_path`'s folder), its pictures in
    <report stem>_html/. figures: {name: png path beside the report}; lowest: neighbour records
    (test.py's neighbours file format) of the queries with the lowest AP, each with its "ap"."""
    report_path = Path(report_path)
    out = report_path.with_suffix(".html")
    folder = report_path.with_name(f"{report_path.stem}_html")
    parts = [f"<p>{escape(report['model'])}, embedding {report['embedding_dim']}, checkpoint "
             f"{escape(report['checkpoint'])}<br>{escape(report['protocol'])}: {report['num_queries']} queries, "
             f"{report['num_gallery']} gallery images; images of a query's own patient "
             f"{'left out' if report.get('same_patient_excluded') else 'kept'}</p>"]
    if "confidence_intervals" not in report:
        parts.append("<p class=\"note\">No intervals: run test.py with --bootstrap 1000 for patient-bootstrap "
                     "95% intervals.</p>")
    parts.append("<h2>Metrics (percent)</h2>" + table(["metric", "value", "95% interval (patients)"],
                                                      metric_rows(report), numeric=(1,)))
    vote_k = str(report.get("abstention", {}).get("vote_k", next(iter(report["classification"]))))
    if "per_class" in report:
        parts.append("<h2>Per class</h2>" + table(
            ["class", "queries", "patients", "R@1", "AP", f"vote recall, k = {vote_k}"],
            [(name, c["queries"], c["patients"], f"{c['recall_at_1']:.1f}", f"{c['ap']:.1f}",
              f"{c['vote_recall'].get(vote_k, float('nan')):.1f}")
             for name, c in report["per_class"]["classes"].items()],
            numeric=(1, 2, 3, 4, 5)))
    if "per_finding" in report:  # multi-label lists
        knn = report["knn"].get(vote_k) or next(iter(report["knn"].values()))
        parts.append(f"<h2>Per finding (relevance: {escape(report['relevance'])})</h2>" + table(
            ["finding", "queries", "AP", "kNN AUROC"],
            [(name, row["queries"], "n/a" if row["ap"] is None else f"{row['ap']:.1f}",
              "n/a" if knn["auroc"].get(name) is None else f"{knn['auroc'][name]:.1f}")
             for name, row in report["per_finding"].items()], numeric=(1, 2, 3)))
    if report.get("branch_attribution"):
        shares = ", ".join(f"{escape(b)} {v:.1f}%" for b, v in report["branch_attribution"].items())
        parts.append(f"<p>Each branch's share of the query-to-neighbour similarity: {shares}</p>")
    if "ood" in report:
        parts.append(f"<p>Out of distribution ({escape(report['ood']['detector'])}): " + ", ".join(
            f"{escape(score)} {count}" for score, count in report["ood"]["flagged_count"].items())
            + f" of {report['num_queries']} queries flagged</p>")
    if figures:
        parts.append("<h2>Figures</h2><div class=\"films\">" + "".join(
            figure(Path(path).name, f"{name} figure", escape(name), "figure-wide") for name, path in figures.items())
            + "</div>")
    if lowest:
        parts.append(f"<h2>The {len(lowest)} queries with the lowest AP, and their neighbours</h2>")
    for i, record in enumerate(lowest):
        src = picture(record["query"], folder, f"low{i:02d}.png", bit_depth)
        caption = (f"<b>query</b> {escape(Path(record['query']).name)}<br>label {escape(record['label'])}<br>"
                   f"AP {100 * record['ap']:.1f}<br>vote {escape(record['vote'])}<br>"
                   f"patient {escape(record['patient'])}")
        films = [figure(src, f"query film {Path(record['query']).name}, label {record['label']}", caption, "query")]
        films += neighbour_figures(record["neighbours"], folder, f"low{i:02d}", record["label"], bit_depth)
        parts.append(f"<h3>{escape(Path(record['query']).name)}</h3><div class=\"films\">{''.join(films)}</div>")
    return write_page(out, f"Evaluation report: {report['model']}", "\n".join(parts))
