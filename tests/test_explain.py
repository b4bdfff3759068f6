"""Explanations: Grad-CAM sanity checks, region statistics, ontology rules, explain.py end to end."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import explain
import train
from conftest import SMALL_MODEL
from cxr import demo_dataset, gradcam, regions
from cxr import ontology as onto
from cxr.checkpoints import load_checkpoint
from cxr.errors import UserError
from cxr.gradcam import METHODS, RetrievalGradCAM, default_layers
from cxr.runtime import Runtime
from model import build_model
from test_train import ckpt, phantoms, tiny_args  # noqa: F401  (the phantoms fixture)


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):  # noqa: F811
    save_dir = tmp_path_factory.mktemp("run")
    train.main(tiny_args(phantoms, save_dir, "--epochs", "2", "--img-size", "64"))
    return ckpt(save_dir, "best")


def small_model(name="hybrid_convnext_vit", seed=0):
    torch.manual_seed(seed)
    return build_model(name, embedding_dim=16, pretrained=False, neck="bn", **SMALL_MODEL).eval()


def correlation(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


# ---------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize("method", METHODS)
def test_maps_depend_on_the_weights_and_on_the_target(method):
    model = small_model()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target_a, target_b = torch.randn(2, 16), torch.randn(2, 16)
    baseline = torch.zeros(3, 64, 64) if method == "ig" else None  # ig integrates from a reference image
    maps = RetrievalGradCAM(model, method=method, baseline=baseline)(images, target_a)
    assert set(maps) == {"convnext", "vit", "fused", "similarity"}
    for branch in ("convnext", "vit", "fused"):
        assert maps[branch].shape == (2, 64, 64) and torch.isfinite(maps[branch]).all()
        assert maps[branch].amax(dim=(1, 2)).allclose(torch.ones(2))  # scaled to a peak of 1
    again = RetrievalGradCAM(model, method=method, baseline=baseline)(images, target_a)
    assert torch.equal(maps["fused"], again["fused"])  # deterministic
    other_target = RetrievalGradCAM(model, method=method, baseline=baseline)(images, target_b)
    assert correlation(maps["fused"], other_target["fused"]) < 0.95
    randomised = RetrievalGradCAM(small_model(seed=7), method=method, baseline=baseline)(images, target_a)
    assert correlation(maps["fused"], randomised["fused"]) < 0.9  # model-randomisation check


def test_layers_of_each_model_and_branch_weights():
    hybrid = small_model()
    assert default_layers(hybrid) == {"convnext": "convnext.backbone.stages_0",
                                      "vit": "vit.backbone.blocks.11.norm1"}
    assert default_layers(hybrid, convnext_stage=2)["convnext"].endswith("stages_2")
    assert set(default_layers(small_model("convnextv2"))) == {"convnext"}
    assert set(default_layers(small_model("vit"))) == {"vit"}
    resnet = build_model("resnet50", embedding_dim=16, img_size=64, pretrained=False).eval()
    maps = RetrievalGradCAM(resnet)(torch.randn(1, 3, 64, 64), torch.randn(1, 16))
    assert set(maps) == {"cnn", "fused", "similarity"} and maps["cnn"].shape == (1, 64, 64)
    images, target = torch.randn(2, 3, 64, 64), torch.randn(2, 16)
    cam = RetrievalGradCAM(hybrid)
    only_conv = cam(images, target, branch_weights={"convnext": [1.0, 1.0], "vit": [0.0, 0.0]})
    assert torch.allclose(only_conv["fused"], only_conv["convnext"])
    with pytest.raises(ValueError, match="saliency method"):
        RetrievalGradCAM(hybrid, method="occlusion")
    with pytest.raises(ValueError, match="needs a baseline"):
        RetrievalGradCAM(hybrid, method="ig")


class RegionEmbedding(torch.nn.Module):
    """Embedding = (mean of a 1 x 1 convolution over a fixed region, mean over the whole image):
    along the target (1, 0) only the region's pixels matter."""

    def __init__(self, region):
        super().__init__()
        self.region = region
        self.conv = torch.nn.Conv2d(3, 2, 1)
        torch.nn.init.constant_(self.conv.weight, 1.0)

    def forward(self, x):
        f = self.conv(x)
        return torch.stack([f[:, 0][:, self.region].mean(1), f[:, 1].mean(dim=(1, 2))], dim=1)


def test_integrated_gradients_credit_the_pixels_that_differ_from_the_reference_and_matter():
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[20:26, 4:10] = True
    model = RegionEmbedding(region).eval()
    baseline = torch.zeros(3, 32, 32)
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 21:25, 5:9] = 1.0  # brighter than the reference inside the region ...
    image[:, :, 2:8, 20:28] = 5.0  # ... and far brighter outside it, where the target does not look
    cam = RetrievalGradCAM(model, layers={"cnn": "conv"}, method="ig", baseline=baseline, steps=4, smooth=0)
    maps = cam(image, torch.tensor([[1.0, 0.0]]))
    fused = maps["fused"][0]
    assert fused[21:25, 5:9].min() == pytest.approx(1.0) and fused[~region].max() == 0
    # the same image as the reference: nothing differs, nothing is credited
    same = RetrievalGradCAM(model, layers={"cnn": "conv"}, method="ig", baseline=image[0], smooth=0)
    assert same(image, torch.tensor([[1.0, 0.0]]))["fused"].abs().max() == 0
    smoothed = RetrievalGradCAM(model, layers={"cnn": "conv"}, method="ig", baseline=baseline, steps=4, smooth=2)
    blurred = smoothed(image, torch.tensor([[1.0, 0.0]]))["fused"][0]
    assert 0 < blurred[18, 7] < 1 and blurred.argmax() // 32 in range(21, 25)  # spread, same peak


def test_input_gradient_credits_where_the_target_looks_whatever_the_pixels_are():
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[20:26, 4:10] = True
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 2:8, 20:28] = 5.0  # bright outside the region: no gradient there
    cam = RetrievalGradCAM(RegionEmbedding(region).eval(), layers={"cnn": "conv"}, method="gradient", smooth=0)
    fused = cam(image, torch.tensor([[1.0, 0.0]]))["fused"][0]
    # the whole region, though it equals an all-zero reference (where ig would credit nothing)
    assert fused[region].min() == pytest.approx(1.0) and fused[~region].max() == 0
    assert not METHODS["gradient"].needs_reference  # no baseline asked for


def test_integrated_gradients_add_up_to_the_similarity_change_on_a_nonlinear_model():
    from cxr.gradcam import integrated_gradients
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.Softplus(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    images, baseline = torch.randn(2, 3, 16, 16), torch.randn(3, 16, 16) * 0.1
    targets = torch.randn(2, 4)
    unit = torch.nn.functional.normalize(targets, dim=1)

    def score(x):
        with torch.no_grad():
            return (model(x) * unit).sum(1)

    change = score(images) - score(baseline.expand_as(images))
    attribution = integrated_gradients(model, images, targets, baseline, steps=64)
    assert attribution.shape == images.shape
    assert torch.allclose(attribution.sum(dim=(1, 2, 3)), change, rtol=0.01, atol=1e-4)  # completeness
    # one step is gradient x (x - x0) at the midpoint: not the integral on a curved model
    one = integrated_gradients(model, images, targets, baseline, steps=1).sum(dim=(1, 2, 3))
    assert not torch.allclose(one, change, rtol=0.01, atol=1e-4)
    # from another baseline the attribution changes (the path starts where it is told)
    other = integrated_gradients(model, images, targets, torch.zeros(3, 16, 16), steps=64)
    assert not torch.allclose(other, attribution, atol=1e-4)


def test_ig_map_under_bf16_autocast_keeps_the_mode_and_a_huge_smoothing_stays_finite():
    model = small_model().train()
    cam = RetrievalGradCAM(model, method="ig", baseline=torch.zeros(3, 64, 64), steps=2, smooth=500)
    maps = cam(torch.randn(2, 3, 64, 64), torch.randn(2, 16), amp_dtype=torch.bfloat16)
    assert torch.isfinite(maps["fused"]).all() and maps["fused"].shape == (2, 64, 64) and model.training


def test_contrast_target_is_the_finding_minus_the_reference_class():
    prototypes = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    ctx = {"target": "contrast", "prototypes": prototypes, "reference": 0}
    votes = torch.tensor([2, 0, 1])
    targets = explain.explanation_targets(ctx, votes, None)
    assert torch.allclose(targets[0], prototypes[2] - prototypes[0])
    assert torch.allclose(targets[1], prototypes[0])  # predicted as the reference: its own prototype
    assert torch.allclose(targets[2], prototypes[1] - prototypes[0])
    ctx["target"] = "prototype"
    assert torch.equal(explain.explanation_targets(ctx, votes, None), prototypes[votes])


def test_map_under_bf16_autocast_and_in_training_mode_model():
    model = small_model().train()
    maps = RetrievalGradCAM(model)(torch.randn(2, 3, 64, 64), torch.randn(2, 16), amp_dtype=torch.bfloat16)
    assert torch.isfinite(maps["fused"]).all() and model.training  # mode restored


# ---------------------------------------------------------------------- region statistics
def hand_made_masks(size=60):
    lungs = np.zeros((size, size), bool)
    lungs[10:40, 10:25] = True  # image left = patient right
    lungs[10:40, 35:50] = True
    heart = np.zeros((size, size), bool)
    heart[28:42, 22:40] = True
    lungs &= ~heart
    return lungs, heart


def test_region_statistics_on_hand_made_masks():
    lungs, heart = hand_made_masks()
    saliency = np.zeros(lungs.shape)
    saliency[32:36, 12:16] = 1.0  # patient's right lung, lower third (rows 30-39)
    saliency[0:2, 0:2] = 0.5  # outside both
    stats = regions.region_statistics(saliency, lungs, heart)
    assert stats["lungs_share"] == pytest.approx(16 / 18) and stats["outside_share"] == pytest.approx(2 / 18)
    assert stats["heart_share"] == 0.0
    assert stats["top_zone"] == "right_lower" and stats["peak_zone"] == "right_lower"
    assert stats["right_lung_share"] == pytest.approx(1.0) and stats["lower_share"] == pytest.approx(1.0)
    assert stats["ctr"] == pytest.approx(18 / 40)  # heart 18 columns wide, lungs 40
    assert stats["peak_xy"] == [12, 32]  # [x, y]: column, then row
    # masks of another size are resized to the map; a missing mask gives None, not a guess
    big = np.kron(saliency, np.ones((2, 2)))
    resized = regions.region_statistics(big, lungs, heart)
    assert resized["top_zone"] == "right_lower" and resized["ctr"] == pytest.approx(18 / 40, abs=0.03)
    no_heart = regions.region_statistics(saliency, lungs, None)
    assert no_heart["ctr"] is None and no_heart["heart_share"] is None and no_heart["outside_share"] is None
    nothing = regions.region_statistics(saliency)
    assert nothing["top_zone"] is None and nothing["zones"] is None and nothing["peak_xy"] is not None


def test_zones_left_right_and_lesion_ground_truth():
    lungs, _ = hand_made_masks()
    zones, midline = regions.zone_map(lungs)
    assert regions.ZONES[zones[12, 12]] == "right_upper" and regions.ZONES[zones[25, 45]] == "left_middle"
    lesion = np.zeros_like(lungs)
    lesion[33:39, 36:44] = True
    assert regions.lesion_zones(lesion, lungs) == ["left_lower"]
    assert regions.pointing_hit((40, 35), lesion, tolerance=0)
    assert not regions.pointing_hit((20, 20), lesion, tolerance=5)
    assert regions.pointing_hit((30, 36), lesion, tolerance=6)  # 6 pixels left of the lesion


def test_ctr_from_written_masks_matches_the_generator(tmp_path):
    root = tmp_path / "demo"
    demo_dataset.write_demo_dataset(root, train_per_class=1, test_per_class=4, size=96, seed=3)
    meta = json.loads((root / "demo_meta.json").read_text())["images"]
    for name, info in meta.items():
        lungs = regions.load_mask(root / "masks" / "lungs" / name, size=(150, 150))  # resized
        heart = regions.load_mask(root / "masks" / "heart" / name, size=(150, 150))
        assert regions.cardiothoracic_ratio(lungs, heart) == pytest.approx(info["ctr"], abs=0.03)


# ---------------------------------------------------------------------- ontology
def base_stats(**changes):
    stats = {"ctr": 0.45, "lungs_share": 0.8, "outside_share": 0.1, "lower_share": 0.3,
             "right_lung_share": 0.5, "left_lung_share": 0.5, "peripheral_share": 0.3,
             "dominant_lung_share": 0.5, "top_zone_share": 0.2, "top_zone": "right_middle",
             "peak_level": "middle"}
    return {**stats, **changes}


RULE_CASES = {  # rule id: (stats where it fires, stats where it stays silent)
    "enlarged_cardiac_silhouette": (dict(ctr=0.62), dict(ctr=0.45)),
    "normal_cardiac_silhouette": (dict(ctr=0.45), dict(ctr=0.62)),
    "basal_effusion": (dict(lower_share=0.7, peak_level="lower"), dict(lower_share=0.7, peak_level="upper")),
    "peripheral_ground_glass": (dict(peripheral_share=0.6, lower_share=0.5),
                                dict(peripheral_share=0.6, lower_share=0.5, left_lung_share=0.1)),
    "focal_consolidation": (dict(dominant_lung_share=0.9, top_zone_share=0.6),
                            dict(dominant_lung_share=0.6, top_zone_share=0.6)),
    "attention_outside_lungs": (dict(outside_share=0.7, lungs_share=0.2), dict(outside_share=0.3)),
    "apical_peripheral_lucency": (dict(peak_level="upper", peripheral_share=0.7),
                                  dict(peak_level="upper", peripheral_share=0.2)),
}


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_each_rule_fires_and_stays_silent(rule):
    ontology = onto.load_ontology()
    assert {r["id"] for r in ontology["rules"]} == set(RULE_CASES)
    fires, silent = RULE_CASES[rule]
    result = onto.reason(ontology, base_stats(**fires), predicted="normal")
    assert rule in result["rules_fired"]
    fired = next(r for r in result["fired"] if r["id"] == rule)
    assert all(fired["values"][k] == v for k, v in fires.items() if k in fired["values"])
    assert rule not in onto.reason(ontology, base_stats(**silent), predicted="normal")["rules_fired"]


def test_reasoning_supports_contradicts_and_absent_statistics():
    ontology = onto.load_ontology()
    big_heart = onto.reason(ontology, base_stats(ctr=0.62), predicted="normal")
    assert big_heart["contradicting"] == ["enlarged_cardiac_silhouette"]
    assert "speaks against normal" in " ".join(big_heart["sentences"])
    agrees = onto.reason(ontology, base_stats(ctr=0.62), predicted="cardiomegaly")
    assert agrees["supporting"] == ["enlarged_cardiac_silhouette"] and not agrees["contradicting"]
    assert "0.62" in " ".join(agrees["sentences"]) and "above 0.53" in " ".join(agrees["sentences"])
    no_masks = onto.reason(ontology, {k: None for k in base_stats()}, predicted="pneumonia")
    assert no_masks["rules_fired"] == [] and "no sign" in no_masks["sentences"][0]
    # It says that the rules could not run, and which statistics were missing, not only "no sign".
    assert len(no_masks["not_evaluated"]) == len(ontology["rules"])
    assert f"{len(ontology['rules'])} of {len(ontology['rules'])} rules could not run" in no_masks["sentences"][0]
    assert "ctr" in no_masks["sentences"][0]
    assert agrees["not_evaluated"] == {}


@pytest.mark.parametrize("breakage, named", [
    (lambda o: o["rules"][2]["when"][0].update(op="=>"), "rules[2] (id 'basal_effusion') when[0]"),
    (lambda o: o["rules"][0].update(supports=["tuberculosis"]), "rules[0] (id 'enlarged_cardiac_silhouette')"),
    (lambda o: o["rules"][1].update(sign="no_such_sign"), "rules[1]"),
    (lambda o: o["rules"].append(dict(o["rules"][0])), "duplicate id"),
    (lambda o: o.pop("findings"), "missing 'findings'"),
])
def test_malformed_ontology_names_the_entry(tmp_path, breakage, named):
    data = json.loads(onto.DEFAULT_ONTOLOGY.read_text())
    breakage(data)
    path = tmp_path / "ontology.json"
    path.write_text(json.dumps(data))
    with pytest.raises(onto.OntologyError, match=re.escape(named)):
        onto.load_ontology(path)
    path.write_text("{ not json")
    with pytest.raises(onto.OntologyError, match="line 1"):
        onto.load_ontology(path)


# ---------------------------------------------------------------------- explain.py
def test_explain_one_image_and_a_batch(trained, phantoms, tmp_path, capsys):  # noqa: F811
    gallery = ["--gallery-image-list", str(phantoms / "train_split.txt"),
               "--gallery-dataset-dir", str(phantoms / "train")]
    common = ["--resume", str(trained), "--device", "cpu", "--workers", "0", "--topk", "3",
              "--faithfulness-steps", "4", *gallery]
    name = "phantom_test_00000.png"
    image = phantoms / "test" / name
    # masks of another size than the image: resized
    for kind in ("lungs", "heart"):
        Image.open(phantoms / "masks" / kind / name).resize((100, 100)).save(tmp_path / f"{kind}.png")
    record = explain.main(explain.get_args_parser().parse_args([
        *common, "--image", str(image), "--lung-mask", str(tmp_path / "lungs.png"),
        "--heart-mask", str(tmp_path / "heart.png"), "--out", str(tmp_path / "one")]))
    on_disk = json.loads((tmp_path / "one" / "explanation.json").read_text())
    for key in ("image", "label", "predicted", "peak_xy", "top_zone", "ctr", "rules_fired",
                "regions", "branch_attribution", "sentences", "faithfulness", "neighbours"):
        assert key in on_disk
    assert on_disk["image"] == str(image) and record["ctr"] is not None
    width, height = Image.open(image).size
    assert 0 <= on_disk["peak_xy"][0] < width and 0 <= on_disk["peak_xy"][1] < height
    for png in ("figure.png", "overlay_image.png", "overlay_convnext.png", "overlay_vit.png", "overlay_fused.png"):
        assert (tmp_path / "one" / png).is_file()
    # the figure: a title in words, the masks' outlines, a colour bar, no empty panel
    assert on_disk["figure"] == {"title": on_disk["sentences"][0], "outlined": True,
                                 "colour_bar": "attribution (each map scaled to 0-1)", "empty_panels": 0}
    assert "_" not in on_disk["figure"]["title"]  # words, not rule ids
    attribution = on_disk["branch_attribution"]
    assert attribution["convnext_share"] + attribution["vit_share"] == pytest.approx(1.0)
    f = on_disk["faithfulness"]
    assert len(f["deletion_curve"]) == 5
    assert f["deletion_curve"][0] == pytest.approx(on_disk["target_similarity"], abs=1e-4)
    assert f["image_independent_map"] == "centred_gaussian"  # one image: no class mean over others
    assert {"smooth_random_deletion_auc", "image_independent_insertion_auc"} <= set(f)
    assert capsys.readouterr().out.startswith("Retrieved finding:")

    summary = explain.main(explain.get_args_parser().parse_args([
        *common, "--image-list", str(phantoms / "test_split.txt"), "--dataset-dir", str(phantoms / "test"),
        "--mask-dir", str(phantoms / "masks"), "--out", str(tmp_path / "batch"), "--faithfulness-images", "6",
        "--prior-image-list", str(phantoms / "train_split.txt"), "--prior-dataset-dir", str(phantoms / "train")]))
    on_disk = json.loads((tmp_path / "batch" / "summary.json").read_text())
    assert len(on_disk["images"]) == 25 and on_disk["images"][0]["image"] == name
    for record in on_disk["images"]:
        assert {"image", "label", "predicted", "peak_xy", "top_zone", "ctr", "rules_fired"} <= set(record)
    aggregate = summary["aggregate"]
    assert aggregate["num_with_lesion"] == 15  # pneumonia, COVID-19 and effusion phantoms
    for key, tolerance in (("pointing_game", 0.05), ("pointing_game_at_10pct", 0.1)):
        game = aggregate[key]
        assert game["tolerance"] == tolerance and set(game["by_label"]) == {"pneumonia", "COVID-19", "effusion"}
        overall = game["overall"]
        assert set(overall["map"]) == {"convnext", "vit", "fused"} and overall["map"]["fused"]["n"] == 15
        for rate in (overall["map"]["fused"], overall["chance"], overall["prior_point"],
                     overall["mismatched"]["fused"]):
            assert 0 <= rate["ci95"][0] <= rate["rate"] <= rate["ci95"][1] <= 1
        gain = overall["image_specific_gain"]["fused"]
        assert gain["mean"] == pytest.approx(overall["map"]["fused"]["rate"] - overall["mismatched"]["fused"]["rate"])
    assert aggregate["image_specific_gain"]["pneumonia"] == \
        aggregate["pointing_game"]["by_label"]["pneumonia"]["image_specific_gain"]["fused"]
    prior = aggregate["location_prior"]
    assert prior["fitted_on"] == str(phantoms / "train_split.txt")
    assert set(prior["points"]["pointing_game"]) == {"pneumonia", "COVID-19", "effusion"}
    assert prior["num_fitting_images"] == {"pneumonia": 6, "COVID-19": 6, "effusion": 6}
    zones = aggregate["zone_agreement"]["overall"]
    assert 0 <= zones["map"]["rate"] <= 1 and zones["prior_zone"]["n"] == 15
    faithful = aggregate["faithfulness"]
    assert faithful["num_images"] == 6 and isinstance(faithful["beats_both"], bool)
    for base in ("smooth_random", "image_independent"):
        assert faithful[base]["deletion_advantage"]["mean"] == pytest.approx(
            faithful[base]["deletion_auc"] - faithful["map"]["deletion_auc"])
    assert "pointing game within 5% of the width" in capsys.readouterr().out
    assert set(aggregate["rules_fired_rate_by_label"]) == {"normal", "pneumonia", "COVID-19", "effusion",
                                                           "cardiomegaly"}
    # CTR from the written masks, within 0.03 of the generator's value
    meta = json.loads((phantoms / "demo_meta.json").read_text())["images"]
    assert all(abs(r["ctr"] - meta[r["image"]]["ctr"]) <= 0.03 for r in on_disk["images"])


def test_explain_errors(trained, phantoms, tmp_path):  # noqa: F811
    base = ["--resume", str(trained), "--device", "cpu", "--workers", "0", "--out", str(tmp_path)]
    with pytest.raises(UserError, match="give one of --image"):
        explain.main(explain.get_args_parser().parse_args(base))
    with pytest.raises(UserError, match="give one of --image"):
        explain.main(explain.get_args_parser().parse_args([*base, "--split", "val", "--image",
                                                           str(phantoms / "test" / "phantom_test_00000.png")]))
    with pytest.raises(UserError, match="--reference-class healthy: not a class"):
        explain.main(explain.get_args_parser().parse_args([*base, "--split", "test", "--reference-class", "healthy"]))
    with pytest.raises(UserError, match="--ig-steps 0"):
        explain.main(explain.get_args_parser().parse_args([*base, "--split", "test", "--ig-steps", "0"]))
    for off in (["--faithfulness-steps", "0"], ["--faithfulness-images", "0"]):  # ROAD would be silently skipped
        with pytest.raises(UserError, match="--road draws its curves"):
            explain.main(explain.get_args_parser().parse_args([*base, "--split", "test", "--road", *off]))
    image = str(phantoms / "test" / "phantom_test_00000.png")
    with pytest.raises(UserError, match="no such file"):
        explain.main(explain.get_args_parser().parse_args([*base, "--image", image, "--lung-mask",
                                                           str(tmp_path / "x.png")]))
    listed = ["--image-list", str(phantoms / "test_split.txt"), "--dataset-dir", str(phantoms / "test"),
              "--mask-dir", str(phantoms / "masks")]
    with pytest.raises(UserError, match="shares 25 images"):  # the prior never sees the reported images
        explain.main(explain.get_args_parser().parse_args([
            *base, *listed, "--prior-image-list", str(phantoms / "test_split.txt"),
            "--prior-dataset-dir", str(phantoms / "test")]))
    with pytest.raises(UserError, match="--pointing-tolerance 5"):
        explain.main(explain.get_args_parser().parse_args([*base, *listed, "--pointing-tolerance", "5"]))
    with pytest.raises(UserError, match="go together"):
        explain.main(explain.get_args_parser().parse_args([
            *base, *listed, "--prior-image-list", str(phantoms / "train_split.txt")]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"findings": {}, "signs": {}, "rules": []}))
    with pytest.raises(UserError, match="findings"):
        explain.main(explain.get_args_parser().parse_args([*base, "--image", image, "--ontology", str(bad)]))


@pytest.mark.parametrize("condition, named", [
    ({"stat": "cardiothoracic_ratio", "op": ">", "value": 0.5}, "unknown stat 'cardiothoracic_ratio'"),
    ({"stat": "ctr", "op": ">", "value": "0.53"}, "must be a number"),
    ({"stat": "peak_level", "op": "==", "value": 2}, "must be a string"),
])
def test_ontology_conditions_name_unknown_statistics_and_wrong_values(tmp_path, condition, named):
    data = json.loads(onto.DEFAULT_ONTOLOGY.read_text())
    data["rules"][0]["when"] = [condition]
    data["rules"][0]["sentence"] = "A sentence."
    path = tmp_path / "ontology.json"
    path.write_text(json.dumps(data))
    with pytest.raises(onto.OntologyError, match=named):
        onto.load_ontology(path)


def test_peak_is_reported_in_the_original_files_pixels(trained, phantoms, tmp_path):  # noqa: F811
    wide = tmp_path / "wide.png"  # another size and aspect ratio than the 64 x 64 model input
    Image.open(phantoms / "test" / "phantom_test_00003.png").resize((200, 120)).save(wide)
    record = explain.main(explain.get_args_parser().parse_args([
        "--resume", str(trained), "--image", str(wide), "--out", str(tmp_path / "o"), "--device", "cpu",
        "--workers", "0", "--faithfulness-steps", "0", "--topk", "2", "--figure-neighbours", "0",
        "--gallery-image-list", str(phantoms / "train_split.txt"), "--gallery-dataset-dir", str(phantoms / "train")]))
    fused = np.asarray(Image.open(tmp_path / "o" / "overlay_fused.png"))
    assert fused.shape[:2] == (120, 200)
    x, y = record["peak_xy"]
    assert 0 <= x < 200 and 0 <= y < 120
    maps = gradcam.heatmaps(explain.build_context(explain.get_args_parser().parse_args([
        "--resume", str(trained), "--out", str(tmp_path), "--device", "cpu", "--workers", "0",
        "--gallery-image-list", str(phantoms / "train_split.txt"),
        "--gallery-dataset-dir", str(phantoms / "train")]))["cam"], explain.build_transform(64, train=False),
        [wide], torch.randn(1, 16), torch.device("cpu"))
    assert maps[0][1].shape == (120, 200)


def test_explain_split_val_and_test_from_the_checkpoints_run(trained, phantoms, tmp_path):  # noqa: F811
    from cxr import run_data
    base = ["--resume", str(trained), "--device", "cpu", "--workers", "0", "--topk", "3",
            "--faithfulness-steps", "0", "--mask-dir", str(phantoms / "masks"), "--save-overlays", "0"]
    run = run_data.recorded_run(load_checkpoint(trained))
    train_part, val_part = run_data.training_splits(run, Runtime(device=torch.device("cpu")),
                                                    run["dataset"], run["dataset_dir"])
    summary = explain.main(explain.get_args_parser().parse_args([*base, "--split", "val", "--out",
                                                                 str(tmp_path / "v")]))
    val_names = [str(p.relative_to(val_part.image_root)) for p in val_part.paths]
    assert [r["image"] for r in summary["images"]] == val_names and summary["split"] == "val"
    val_files = {str(p) for p in val_part.paths}
    # the gallery is the training list less validation: no image is its own neighbour
    assert all(n["path"] not in val_files for r in summary["images"] for n in r["neighbours"])
    assert summary["saliency"] == {"method": "ig", "target": "contrast", "reference_class": "normal",
                                   "ig_baseline": "mean image of the gallery's normal images",
                                   "ig_steps": 8, "smooth_px": 0.0}
    summary = explain.main(explain.get_args_parser().parse_args([*base, "--split", "test", "--out",
                                                                 str(tmp_path / "t")]))
    assert len(summary["images"]) == 25 and summary["aggregate"]["num_with_lesion"] == 15
    prior = summary["aggregate"]["location_prior"]
    assert prior["fitted_on"] == "the run's training images less validation"
    lesion_labels = {"pneumonia", "COVID-19", "effusion"}
    fitted = sum(1 for t in train_part.targets.tolist() if train_part.classes[t] in lesion_labels)
    assert sum(prior["num_fitting_images"].values()) == fitted < 18  # the 18 lesion phantoms less validation's


def test_reference_class_gallery_checks_and_split_without_a_recorded_run(phantoms, capsys):  # noqa: F811
    import argparse

    from cxr import explain_inputs
    from dataset import ImageListDataset
    classes = ["normal", "pneumonia", "COVID-19", "effusion", "cardiomegaly"]

    def args(**kw):
        return argparse.Namespace(**{"reference_class": None, "method": "ig", "target": "contrast", "split": None,
                                     "resume": "ckpt.pth", **kw})

    assert explain_inputs.reference_class(args(), classes) == "normal"
    assert explain_inputs.reference_class(args(reference_class="effusion"), classes) == "effusion"
    assert explain_inputs.reference_class(args(), ["No Finding", "Pneumonia"]) == "No Finding"  # NIH, CheXpert
    assert explain_inputs.reference_class(args(), ["Effusion", "Pneumonia"]) is None
    assert "--target contrast falls back" in capsys.readouterr().out
    assert explain_inputs.reference_class(args(method="gradnorm", target="neighbour"), ["a", "b"]) is None
    assert capsys.readouterr().out == ""  # nothing falls back: nothing to say
    gallery = ImageListDataset(phantoms / "test", phantoms / "test_split.txt", "covidx", classes)
    normal = [i for i, t in enumerate(gallery.targets.tolist()) if t == 0]
    gallery.transform = lambda image: torch.as_tensor(np.array(image.convert("L").resize((4, 4))),
                                                      dtype=torch.float32).expand(3, 4, 4)
    expected = torch.stack([gallery[i][0] for i in normal]).mean(0)  # the class's images only
    assert torch.allclose(explain_inputs.reference_image(gallery, 0), expected)
    assert not torch.allclose(explain_inputs.reference_image(gallery, None), expected)
    without_normal = gallery.subset([i for i in range(len(gallery)) if i not in normal], gallery.transform)
    with pytest.raises(UserError, match="no image of class 'normal'"):
        explain_inputs.reference_image(without_normal, 0)
    with pytest.raises(UserError, match="shares 5 images with the validation images"):
        explain_inputs.check_gallery(args(split="val"), gallery, gallery.subset(normal))
    explain_inputs.check_gallery(args(split="test"), gallery, gallery.subset(normal))  # test: the run's gallery
    with pytest.raises(UserError, match="does not record its run's data"):
        explain_inputs.split_sets(args(split="val"), {}, None, classes, "covidx", None)


# ---------------------------------------------------------------------- sanity checks, ROAD
def test_sanity_all_in_batch_mode_reports_the_randomised_copy_beside_the_trained_model(
        trained, phantoms, tmp_path, capsys):  # noqa: F811
    from cxr import sanity_checks
    from cxr.checkpoints import load_trained_model
    model, checkpoint, _ = load_trained_model(trained, torch.device("cpu"))
    copy = sanity_checks.randomised_copy(model, checkpoint["model_config"], sanity_checks.cascade_levels(model)[-1][1])
    trained_parameters = dict(model.named_parameters())
    for name, parameter in copy.named_parameters():
        if parameter.requires_grad:  # the BN neck's shift is a frozen zero in both
            assert not torch.equal(parameter, trained_parameters[name]), name
    summary = explain.main(explain.get_args_parser().parse_args([
        "--resume", str(trained), "--device", "cpu", "--workers", "0", "--topk", "3", "--split", "test",
        "--mask-dir", str(phantoms / "masks"), "--out", str(tmp_path / "s"), "--save-overlays", "0",
        "--faithfulness-steps", "2", "--faithfulness-images", "4", "--ig-steps", "2", "--sanity", "all", "--road"]))
    aggregate = summary["aggregate"]
    sanity = aggregate["sanity"]
    assert sanity["levels"] == ["all"] and sanity["seed"] == 0
    randomised = sanity["copies"]["all"]
    rho = randomised["spearman"]
    assert -1 <= rho["mean"] <= 1 and rho["n"] + rho["undefined"] == 25 and rho["mean"] < 0.9
    beyond = sanity["gain_beyond_randomised"]
    assert beyond == randomised["gain_beyond"] and beyond["n"] == 15
    assert beyond["mean"] == pytest.approx(aggregate["image_specific_gain"]["overall"]["mean"]
                                           - randomised["image_specific_gain"]["mean"])
    assert 0 <= randomised["pointing"]["rate"] <= 1 and randomised["pointing"]["n"] == 15
    for faithful in (aggregate["faithfulness"], randomised["faithfulness"]):  # ROAD beside the curves, both runs
        assert faithful["num_images"] == 4 and faithful["road"]["num_images"] == 4
        for base in ("smooth_random", "image_independent"):
            assert {"road_morf_auc", "road_lerf_auc", "road_morf_advantage", "road_lerf_advantage"} <= set(
                faithful["road"][base])
    record = summary["images"][0]["faithfulness"]
    assert len(record["road_morf_curve"]) == 3 and record["road_morf_curve"][0] == pytest.approx(
        record["road_lerf_curve"][0])
    # the copy ran the whole pipeline with its own weights: its own gallery, votes and targets
    copy_run = json.loads((tmp_path / "s" / "sanity" / "all" / "summary.json").read_text())
    assert [r["image"] for r in copy_run["images"]] == [r["image"] for r in summary["images"]]
    assert [r["target_similarity"] for r in copy_run["images"]] != [r["target_similarity"] for r in summary["images"]]
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["aggregate"]["sanity"]["levels"] == ["all"]
    out = capsys.readouterr().out
    assert "gain beyond the all-layers randomised copy" in out and "ROAD (imputed) MoRF AUC" in out


def test_sanity_needs_a_list(trained, phantoms, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="--sanity all compares the maps of a list"):
        explain.main(explain.get_args_parser().parse_args([
            "--resume", str(trained), "--device", "cpu", "--out", str(tmp_path), "--sanity", "all",
            "--image", str(phantoms / "test" / "phantom_test_00000.png")]))
