"""Pictures and console output of explain.py: heat-map overlays and the query/neighbour figure."""
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cxr.gradcam import METHODS  # noqa: E402

TITLES = {"convnext": "ConvNeXt + MXA", "vit": "ViT tokens", "cnn": "CNN", "fused": "fused"}


def overlay(image, saliency, alpha=0.45):
    """An RGB uint8 array: the radiograph in grey with the map in the 'jet' colours on top."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0
    heat = plt.get_cmap("jet")(np.clip(saliency, 0, 1))[..., :3]
    return (255 * ((1 - alpha) * grey + alpha * heat)).astype(np.uint8)


def write_overlays(folder, image, maps):
    """overlay_image.png and overlay_<branch>.png, each at the original file's resolution."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(folder / "overlay_image.png")
    for branch, saliency in maps.items():
        Image.fromarray(overlay(image, saliency)).save(folder / f"overlay_{branch}.png")


def outline(ax, masks):
    """The lung and heart masks' outlines on a panel (white lungs, cyan heart)."""
    for kind, colour in (("lungs", "white"), ("heart", "cyan")):
        if masks.get(kind) is not None and masks[kind].any():
            ax.contour(masks[kind].astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8)


def write_figure(path, image, maps, record, neighbour_maps, masks=None):
    """Row 1: the query and its maps (with the lung and heart outlines when `masks` are given), the
    rest of the explanation in words and the maps' colour scale; row 2: the top neighbours, each
    with the map of where it resembles the query. The title is the explanation's first sentence.
    Each row has just its own panels (no empty ones). Returns what was drawn (for the tests)."""
    masks = masks or {}
    sentences = record.get("sentences") or []
    title = sentences[0] if sentences else f"Retrieved finding: {record['predicted']}"
    words = sentences[1:]
    top_panels = 1 + len(maps) + bool(words)
    width = 2.6 * max(top_panels, len(neighbour_maps)) + 0.6
    fig = plt.figure(figsize=(width, 2.9 * (2 if neighbour_maps else 1) + 0.6), layout="constrained")
    rows = fig.subfigures(2 if neighbour_maps else 1, 1, squeeze=False)[:, 0]
    top = rows[0].subplots(1, top_panels + 1, squeeze=False,
                           gridspec_kw={"width_ratios": [1] * top_panels + [0.08]})[0]
    for ax in top[:-1]:
        ax.axis("off")
    top[0].imshow(image.convert("L"), cmap="gray")
    outline(top[0], masks)
    label = f"label {record['label']}, " if record["label"] else ""
    top[0].set_title(f"query\n{label}vote {record['predicted']}", fontsize=9)
    share = record.get("branch_attribution") or {}
    for ax, (branch, saliency) in zip(top[1:], maps.items()):
        ax.imshow(overlay(image, saliency))
        outline(ax, masks)
        caption = TITLES.get(branch, branch)
        method = METHODS.get((record.get("saliency") or {}).get("method"))
        if branch == "fused" and method is not None and method.input_space:
            reference = record["saliency"]["reference_class"]
            caption = f"{method.title}\n" + (f"from the {reference} mean image" if reference and method.needs_reference
                                              else "whole model")
        if branch in ("convnext", "vit") and share.get(f"{branch}_share") is not None:
            caption += f"\n{share[f'{branch}_share']:.0%} of the similarity"
        ax.set_title(caption, fontsize=9)
        if branch == "fused":
            x, y = record["peak_xy"]
            ax.plot([x], [y], marker="+", color="white", markersize=12, mew=2)
    if words:
        text = "\n\n".join("\n".join(textwrap.wrap(sentence, 34)) for sentence in words)
        top[top_panels - 1].text(0.0, 1.0, text, fontsize=8, va="top", ha="left")
    scale = top[-1]
    fig.colorbar(plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0, 1)), cax=scale)
    scale.set_ylabel("attribution (each map scaled to 0-1)", fontsize=8)
    scale.tick_params(labelsize=7)
    if neighbour_maps:
        bottom = rows[1].subplots(1, len(neighbour_maps), squeeze=False)[0]
        for rank, (ax, neighbour, (img, saliency)) in enumerate(zip(bottom, record["neighbours"], neighbour_maps),
                                                                 start=1):
            ax.axis("off")
            ax.imshow(overlay(img, saliency))
            ax.set_title(f"#{rank} {neighbour['label']}\nsimilarity {neighbour['similarity']:.3f}", fontsize=9)
    fig.suptitle("\n".join(textwrap.wrap(title, int(15 * width))), fontsize=10)
    fig.savefig(path, dpi=100)
    panels = [ax for row in rows for ax in row.axes if ax is not scale]
    drawn = {"title": title, "outlined": bool(masks) and bool(top[0].collections),
             "colour_bar": scale.get_ylabel(),
             "empty_panels": sum(1 for ax in panels if not ax.has_data() and not ax.texts)}
    plt.close(fig)
    return drawn


def print_aggregate(aggregate):
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    def rate(r):  # localisation.rate: {"rate", "ci95", "n"} or None
        return "n/a" if r is None else f"{pct(r['rate'])} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"

    def diff(d):  # localisation.paired_difference, in percentage points
        if d is None:
            return "n/a"
        ci = f" [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]" if d["ci95"] else ""
        return f"{100 * d['mean']:+.1f} points{ci}"

    print(f"explained {aggregate['num_images']} images")
    if "vote_accuracy" in aggregate:
        print(f"  majority-vote accuracy {pct(aggregate['vote_accuracy'])}")
    if "pointing_game" in aggregate:
        print(f"  on {aggregate['num_with_lesion']} images with a lesion (fused map; [95% interval]):")
        for key in ("pointing_game", "pointing_game_at_10pct"):
            game = aggregate[key]["overall"]
            print(f"    pointing game within {100 * aggregate[key]['tolerance']:g}% of the width: "
                  f"{rate(game['map']['fused'])}; chance {rate(game['chance'])}, prior point "
                  f"{rate(game['prior_point'])}, other images' lesions {rate(game['mismatched']['fused'])}")
        by_label = aggregate["pointing_game"]["by_label"]
        print(f"    by class within {100 * aggregate['pointing_game']['tolerance']:g}%: ", end="")
        print("; ".join(f"{label} {rate(s['map']['fused'])} (other lesions {rate(s['mismatched']['fused'])})"
                        for label, s in by_label.items()))
        gain = aggregate["image_specific_gain"]
        print(f"  image-specific gain (own - other lesions): {diff(gain['overall'])}"
              + (f"; pneumonia {diff(gain['pneumonia'])}" if gain["pneumonia"] else ""))
        zones = aggregate["zone_agreement"]["overall"]
        print(f"  zone agreement {rate(zones['map'])} (most frequent zone of the class {rate(zones['prior_zone'])})")
    if "faithfulness" in aggregate:
        print("  " + faithfulness_line(aggregate["faithfulness"]))
    if "sanity" in aggregate:
        print_sanity(aggregate["sanity"], rate, diff)
    if "convnext_share_of_similarity" in aggregate:
        print(f"  ConvNeXt branch share of the similarity {pct(aggregate['convnext_share_of_similarity'])}")
    m = aggregate.get("masks")  # CheXmask: how many images had usable masks
    if m:
        print(f"  CheXmask lungs and heart for {m['with_masks']} images; {m['below_min_dice']} below "
              f"--min-mask-dice {m['min_mask_dice']:g} and {m['without_row']} without a row have null "
              "region statistics" + (f"; {m['sides_swapped']} with the lungs on mirrored sides"
                                     if m["sides_swapped"] else ""))


def faithfulness_line(f):
    """Deletion/insertion and ROAD areas beside their two baselines, in one or two lines."""
    def verdict(part):
        return ("beats both beyond the 95% intervals of the differences" if part["beats_both_beyond_ci"] else
                "beats both on the means, not beyond the 95% intervals" if part["beats_both"] else "does not beat both")

    def areas(part, lower, higher, names):
        r, i = part["smooth_random"], part["image_independent"]
        return (f"{names[0]} AUC {part['map'][lower]:.3f} (smooth random {r[lower]:.3f}, image-independent "
                f"{i[lower]:.3f}), {names[1]} AUC {part['map'][higher]:.3f} ({r[higher]:.3f}, {i[higher]:.3f}): "
                f"the map {verdict(part)}")

    line = areas(f, "deletion_auc", "insertion_auc", ("deletion", "insertion"))
    if f.get("road"):
        line += "\n  ROAD (imputed) " + areas(f["road"], "road_morf_auc", "road_lerf_auc", ("MoRF", "LeRF"))
    return line


def print_sanity(sanity, rate, diff):
    """One row per randomised copy (cxr/sanity_checks.py) under the trained model's numbers."""
    print(f"  sanity check, {sanity['test']}, seed {sanity['seed']}: weights re-initialised at")
    for name, copy in sanity["copies"].items():
        rho = copy["spearman"]
        ci = f" [{rho['ci95'][0]:.2f}, {rho['ci95'][1]:.2f}]" if rho["ci95"] else ""
        spearman = "n/a" if rho["mean"] is None else f"{rho['mean']:.2f}{ci} over {rho['n']} images"
        faithful = copy["faithfulness"]
        deletion = "" if not faithful else (f"; deletion AUC {faithful['map']['deletion_auc']:.3f}"
                                            + (f", ROAD MoRF {faithful['road']['map']['road_morf_auc']:.3f} "
                                               f"LeRF {faithful['road']['map']['road_lerf_auc']:.3f}"
                                               if faithful.get("road") else ""))
        print(f"    {name}: pointing {rate(copy['pointing'])}, gain {diff(copy['image_specific_gain'])}, "
              f"trained gain beyond it {diff(copy['gain_beyond'])}; Spearman with the trained maps "
              f"{spearman}{deletion}")
    print(f"  gain beyond the all-layers randomised copy: {diff(sanity['gain_beyond_randomised'])}")
