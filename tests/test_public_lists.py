"""The public data sets' readers (NIH, CheXpert, MIMIC-CXR, multi-label CSV) on multi-label
phantoms written in their layouts, the multi-label sampler and losses, and their errors."""
import csv
import gzip
import json

import numpy as np
import pytest
import torch

from cxr.multilabel_demo import CHEXPERT_NAMES, NIH_NAMES, write_multilabel_demo
from cxr.public_lists import default_lists
from dataset import DatasetError, ImageListDataset
from loss import CosineSoftmaxLoss, TripletMarginLoss
from sampler import PKSampler


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    return {layout: write_multilabel_demo(root / layout, layout, train_films=60, test_films=30, size=48,
                                          lateral_share=0.2, uncertain_share=0.3)
            for layout in ("nih", "chexpert", "mimic", "csv")}


def films_of(folder):
    return json.loads((folder / "multilabel_meta.json").read_text())["films"]


def expected(folder, split, names, views="frontal"):
    """(findings set, patient) of the split's films as the generator drew them, in list order."""
    out = []
    for film in films_of(folder):
        if film["split"] == split and (views == "all" or film["view"] == views):
            out.append(set(names[f] for f in film["findings"].split("|")))
    return out


@pytest.mark.parametrize("layout, names", [("nih", NIH_NAMES), ("chexpert", CHEXPERT_NAMES),
                                           ("mimic", CHEXPERT_NAMES)])
def test_readers_give_each_film_its_findings_and_patient(layouts, layout, names):
    folder = layouts[layout]
    train_list, test_list = default_lists(layout, folder)
    for split, list_file in (("train", train_list), ("test", test_list)):
        dataset = ImageListDataset(folder, list_file, layout, list_options={"split": split})
        assert dataset.multilabel
        findings = [set(dataset.findings_of_class(t)) for t in dataset.targets.tolist()]
        assert findings == expected(folder, split, names)  # laterals left out, uncertain read as negative
        assert all(path.is_file() for path in dataset.paths)
        assert len(set(dataset.patients)) < len(dataset)  # follow-up films share their patient
        table = dataset.finding_matrix()
        assert table.shape == (len(dataset), len(dataset.findings))
        assert (table.sum(1) >= 1).all() and (table.sum(1) == 2).any()


def test_views_and_uncertain_policies(layouts):
    folder = layouts["chexpert"]
    train_list, _ = default_lists("chexpert", folder)
    frontal = ImageListDataset(folder, train_list, "chexpert")
    every = ImageListDataset(folder, train_list, "chexpert", list_options={"views": "all"})
    lateral = ImageListDataset(folder, train_list, "chexpert", list_options={"views": "lateral"})
    assert len(every) == len(frontal) + len(lateral) and len(lateral) > 0
    ones = ImageListDataset(folder, train_list, "chexpert", list_options={"uncertain": "ones"})
    uncertain = [f for f in films_of(folder) if f["split"] == "train" and f["view"] == "frontal"]
    changed = sum(ones.findings_of_class(a) != frontal.findings_of_class(b)  # a normal film loses No Finding
                  for a, b in zip(ones.targets.tolist(), frontal.targets.tolist()))
    assert changed == sum(f["uncertain"] is not None for f in uncertain) > 0


def test_multilabel_csv_and_no_finding(layouts, tmp_path):
    folder = layouts["csv"]
    dataset = ImageListDataset(folder / "train", folder / "train.csv", "csv")
    assert dataset.multilabel and "cardiomegaly|effusion" in dataset.classes
    assert dataset.findings == ["COVID-19", "cardiomegaly", "effusion", "normal", "pneumonia"]
    (tmp_path / "a.png").write_bytes((folder / "train" / dataset.paths[0].name).read_bytes())
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,label,patient_id\na.png,No Finding|Effusion,P1\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: 'No Finding' beside findings"):
        ImageListDataset(tmp_path, bad, "csv")
    bad.write_text("filename,label,patient_id\na.png,Effusion||,P1\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: empty finding"):
        ImageListDataset(tmp_path, bad, "csv")


def test_csv_without_patient_ids_warns_once(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("filename,label\na.png,normal\na.png,other\n")
    with pytest.warns(UserWarning, match="no 'patient_id' column") as record:
        ImageListDataset(tmp_path, tmp_path / "l.csv", "csv")
    assert len([w for w in record if "patient_id" in str(w.message)]) == 1


def rewrite_csv(path, change):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = change(rows)
    with opener(path, "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def copy_layout(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_errors_name_file_line_and_what_to_do(layouts, tmp_path):
    nih = copy_layout(layouts["nih"], tmp_path / "nih")
    train_list, _ = default_lists("nih", nih)
    with open(train_list, "a") as f:
        f.write("99999999_000.png\n")
    with pytest.raises(DatasetError, match=r"train_val_list.txt:\d+: 99999999_000.png is not in the label file"):
        ImageListDataset(nih, train_list, "nih")
    rewrite_csv(nih / "Data_Entry_2017.csv", lambda rows: [{k: v for k, v in r.items() if k != "Patient ID"}
                                                          for r in rows])
    with pytest.raises(DatasetError, match=r"Data_Entry_2017.csv:1: .*'Patient ID'"):
        ImageListDataset(nih, train_list, "nih")
    (nih / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DatasetError, match=r"Data_Entry_2017.csv or Data_Entry_2017_v2020.csv\(.gz\) beside the "
                                           r"list.*--label-file"):
        ImageListDataset(nih, train_list, "nih")

    chexpert = layouts["chexpert"]
    train_csv, _ = default_lists("chexpert", chexpert)
    with pytest.raises(DatasetError, match=r"unknown view 'side'.*--views"):
        ImageListDataset(chexpert, train_csv, "chexpert", list_options={"views": "side"})
    with pytest.raises(DatasetError, match=r"uncertain-label policy 'maybe'"):
        ImageListDataset(chexpert, train_csv, "chexpert", list_options={"uncertain": "maybe"})
    with pytest.raises(DatasetError, match=r"none of the list's \d+ films is under .*CheXpert-v1.0-small"):
        ImageListDataset(tmp_path, train_csv, "chexpert")

    mimic = copy_layout(layouts["mimic"], tmp_path / "mimic")
    split_file, _ = default_lists("mimic", mimic)
    full = len(ImageListDataset(mimic, split_file, "mimic"))
    rewrite_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", lambda rows: rows[1:])
    with pytest.warns(UserWarning, match=r"1 films of split 'train' belong to studies the label file"):
        assert len(ImageListDataset(mimic, split_file, "mimic")) == full - 1
    with pytest.raises(DatasetError, match=r"unknown MIMIC-CXR split 'dev'"):
        ImageListDataset(mimic, split_file, "mimic", list_options={"split": "dev"})


def test_multilabel_demo_is_deterministic(tmp_path):
    a = write_multilabel_demo(tmp_path / "a", "nih", train_films=12, test_films=6, size=40)
    b = write_multilabel_demo(tmp_path / "b", "nih", train_films=12, test_films=6, size=40)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    films = films_of(a)
    pairs = sum("|" in film["findings"] for film in films)
    assert 0 < pairs < len(films)
    with pytest.raises(FileExistsError):
        write_multilabel_demo(a, "nih", train_films=2, test_films=2)


def test_pk_sampler_draws_films_carrying_each_finding():
    table = np.zeros((30, 3), bool)
    table[:10, 0] = table[10:20, 1] = table[20:, 2] = True
    table[::4, 1] = True  # second findings
    sampler = PKSampler(table, p=2, k=4, seed=0)
    for batch in sampler:
        first, second = batch[:4], batch[4:]
        assert any(table[first].all(0)) and any(table[second].all(0))  # K films sharing a finding


def test_multilabel_triplet_positives_share_a_finding_and_identity_is_per_finding():
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    table = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1], [1, 0], [0, 1]], dtype=torch.bool)
    loss_fn = TripletMarginLoss(margin=0.2, mining="batch_all")
    multi, _ = loss_fn(embeddings, table)
    # By hand: positives share a finding (film 1 shares with every film), negatives share none.
    dist = torch.cdist(embeddings, embeddings)
    share = (table.float() @ table.float().T) > 0
    terms = [torch.relu(dist[a, p] - dist[a, n] + 0.2) for a in range(6) for p in range(6) for n in range(6)
             if a != p and share[a, p] and not share[a, n]]
    active = [t for t in terms if t > 0]
    assert multi == pytest.approx(float(sum(active) / len(active)), abs=1e-5)
    head = CosineSoftmaxLoss(8, 2, scale=4.0, label_smoothing=0.0)
    logits = 4.0 * embeddings @ torch.nn.functional.normalize(head.weight.detach(), dim=1).T
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, table.float())
    assert float(head(embeddings, table).detach()) == pytest.approx(float(expected_bce), abs=1e-5)


def test_ontology_reads_the_public_names_and_combinations():
    from cxr.ontology import load_ontology, ontology_findings, reason

    ontology = load_ontology()
    assert ontology_findings(ontology, "Cardiomegaly|Pleural Effusion") == {"cardiomegaly", "effusion"}
    assert ontology_findings(ontology, "No Finding") == {"normal"}
    assert ontology_findings(ontology, "Infiltration|Fracture") == {"lung_opacity"}  # unknown names left out
    for finding in ("cardiomegaly", "effusion", "consolidation", "atelectasis", "lung_opacity", "pneumothorax"):
        assert any(finding in rule["supports"] for rule in ontology["rules"]), finding
    stats = {"ctr": 0.6}
    assert reason(ontology, stats, "Cardiomegaly|Effusion")["supporting"] == ["enlarged_cardiac_silhouette"]
    assert reason(ontology, stats, "No Finding")["contradicting"] == ["enlarged_cardiac_silhouette"]


def test_no_finding_is_the_default_reference_class():
    from types import SimpleNamespace

    from cxr.explain_inputs import reference_class

    args = SimpleNamespace(reference_class=None, method="ig", target="contrast")
    assert reference_class(args, ["Cardiomegaly", "Cardiomegaly|Effusion", "No Finding"]) == "No Finding"
