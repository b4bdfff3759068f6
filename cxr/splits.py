"""Leakage checks and provenance of the image lists (training, validation, test, gallery).

A patient with films on both sides of a split, the same file listed twice, or the same image
saved under two names makes retrieval look better than it is: the query finds its own patient.
train.py and test.py call check_splits before any image is embedded:

- patient ids and listed file names shared by two lists are an error that names the first few
  and counts them, unless the user passes --allow-patient-overlap;
- exact duplicate images across lists (same bytes) are reported. Only files whose size occurs in
  another list are hashed, so a check of 30,000 images reads few of them;
- provenance() records what a report was computed on: the SHA-256 of each list file and its
  images and patients per class.
"""
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cxr.errors import UserError
from dataset import read_entries

MAX_NAMED = 5


@dataclass
class Split:
    """One list as the checks see it: listed file names (relative to root), labels, patients."""
    name: str  # train, validation, test, gallery
    source: str  # the list file (or the folder, for folder datasets)
    root: Path  # image folder
    files: list
    labels: list
    patients: list

    @classmethod
    def from_dataset(cls, name, dataset):
        files = [str(Path(p).relative_to(dataset.image_root)) for p in dataset.paths]
        labels = [dataset.classes[int(t)] for t in dataset.targets]
        return cls(name, str(dataset.source), Path(dataset.image_root), files, labels, list(dataset.patients))

    def paths(self):
        return [str((self.root / f).resolve()) for f in self.files]

    @classmethod
    def from_list(cls, name, image_root, list_file, list_format, options=None):
        """Read a list without opening its images (e.g. the training list of a checkpoint);
        options: the public formats' (dataset.read_entries)."""
        entries, source = read_entries(image_root, list_file, list_format, options=options)
        return cls(name, str(source), Path(image_root), [e[0] for e in entries], [e[1] for e in entries],
                   [e[3] for e in entries])


def _named(values):
    return ", ".join(str(v) for v in values)


def _pairs(splits, pairs):
    if pairs is None:
        return [(i, j) for i in range(len(splits)) for j in range(i + 1, len(splits))]
    return pairs


def overlaps(splits, pairs=None):
    """[{"kind": "patient" | "file", "splits": [a, b], "count", "first": [...]}] for each pair
    of lists (index pairs; default all) sharing patients or image files. Files are compared as
    resolved paths: `train/img1.png` and `test/img1.png` are two images (byte-identical copies
    are found by the content check, not here)."""
    found = []
    for i, j in _pairs(splits, pairs):
        a, b = splits[i], splits[j]
        # A folder dataset's patients are its file names: report them once, as files.
        same_as_files = a.patients == a.files and b.patients == b.files
        for kind, left, right in (("patient", a.patients, b.patients), ("file", a.paths(), b.paths())):
            if kind == "patient" and same_as_files:
                continue
            shared = set(left) & set(right)
            if shared:
                found.append({"kind": kind, "splits": [a.name, b.name], "count": len(shared),
                              "first": sorted(shared)[:MAX_NAMED]})
    return found


def _sha256_file(path, block=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def duplicate_images(splits, pairs=None):
    """Exact duplicates (same bytes) in two different lists: [{"splits": [a, b], "count",
    "first": [[file in a, file in b], ...]}]. Files are grouped by size first and only sizes
    seen in two lists are hashed; missing files are skipped (the datasets report them)."""
    by_size = defaultdict(list)  # size -> [(split index, file)]
    for index, split in enumerate(splits):
        for file in dict.fromkeys(split.files):
            path = split.root / file
            try:
                by_size[path.stat().st_size].append((index, file))
            except OSError:
                continue
    wanted = {tuple(sorted(pair)) for pair in _pairs(splits, pairs)}
    by_hash = defaultdict(list)
    for items in by_size.values():
        present = sorted({index for index, _ in items})
        if any((a, b) in wanted for a in present for b in present if a < b):
            for index, file in items:
                by_hash[_sha256_file(splits[index].root / file)].append((index, file))
    found_pairs = defaultdict(list)  # (a, b) -> [(file in a, file in b)]
    for items in by_hash.values():
        for i, (index_a, file_a) in enumerate(items):
            for index_b, file_b in items[i + 1:]:
                key, pair = (index_a, index_b), (file_a, file_b)
                if index_a > index_b:
                    key, pair = (index_b, index_a), (file_b, file_a)
                if key in wanted:
                    found_pairs[key].append(list(pair))
    return [{"splits": [splits[a].name, splits[b].name], "count": len(found), "first": sorted(found)[:MAX_NAMED]}
            for (a, b), found in sorted(found_pairs.items())]


def check_splits(splits, allow_overlap=False, log=print, first_only=False):
    """Compare the lists pairwise (or, with first_only, the first against each other one: a
    test list against its gallery and the training lists, which may themselves be one list);
    raise UserError on shared patients or files unless allow_overlap; report duplicate images.
    Returns {"overlap": [...], "duplicate_images": [...], "allowed": bool, "compared": [...]}
    for the report. `splits` may hold None entries (absent lists)."""
    splits = [s for s in splits if s is not None]
    pairs = [(0, j) for j in range(1, len(splits))] if first_only else None
    found = overlaps(splits, pairs)
    problems = [f"{o['count']} {o['kind']}{'s' if o['count'] > 1 else ''} in both "
                f"{o['splits'][0]} ({_source(splits, o['splits'][0])}) and {o['splits'][1]} "
                f"({_source(splits, o['splits'][1])}): {_named(o['first'])}"
                + (f" (first {MAX_NAMED} of {o['count']})" if o["count"] > MAX_NAMED else "")
                for o in found]
    if problems and not allow_overlap:
        raise UserError("the lists overlap: " + "; ".join(problems) + ". Films of one patient on "
                        "both sides let a query find its own patient and inflate the metrics. "
                        "Remove them from one list, or pass --allow-patient-overlap to go on "
                        "(the report records the overlap)")
    for problem in problems:
        log(f"warning: --allow-patient-overlap: {problem}")
    duplicates = duplicate_images(splits, pairs)
    for d in duplicates:
        log(f"warning: {d['count']} image{'s' if d['count'] > 1 else ''} of {d['splits'][0]} "
            f"{'are' if d['count'] > 1 else 'is'} byte-identical to one in {d['splits'][1]}, e.g. "
            + ", ".join(f"{a} = {b}" for a, b in d["first"][:3]))
    return {"overlap": found, "duplicate_images": duplicates, "allowed": bool(allow_overlap),
            "compared": [s.name for s in splits]}


def _source(splits, name):
    return next(s.source for s in splits if s.name == name)


def provenance(split):
    """{"list", "sha256", "images", "patients", "per_class": {label: {"images", "patients"}}}.
    The SHA-256 is of the list file's bytes; for a folder dataset (no list file) it is of the
    sorted relative file names and says so."""
    source = Path(split.source)
    if source.is_file():
        sha, of = _sha256_file(source), "list file"
    else:
        digest = hashlib.sha256()
        for file in sorted(split.files):
            digest.update(file.encode() + b"\0")
        sha, of = digest.hexdigest(), "sorted file names"
    per_class = defaultdict(lambda: [0, set()])
    for label, patient in zip(split.labels, split.patients):
        per_class[label][0] += 1
        per_class[label][1].add(patient)
    return {"list": split.source, "sha256": sha, "sha256_of": of, "images": len(split.files),
            "patients": len(set(split.patients)),
            "per_class": {label: {"images": n, "patients": len(p)} for label, (n, p) in sorted(per_class.items())}}


def digest(strings):
    """SHA-256 of a sequence of strings (e.g. the image paths of a split)."""
    h = hashlib.sha256()
    for text in strings:
        h.update(text.encode() + b"\0")
    return h.hexdigest()
