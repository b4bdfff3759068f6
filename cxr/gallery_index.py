"""The retrieval index on disk (retrieve.py index writes it, query reads it): a folder of
embedding chunks (.npz) and manifest.json, tied to one model by its fingerprint; and the optional
faiss inverted-file index over it for galleries of many millions."""
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from cxr.errors import UserError

INDEX_FORMAT = "hybrid-retrieval-index"


INDEX_VERSION = 1


FAISS_FILE = "faiss_ivf.index"


MANIFEST = "manifest.json"


class IndexFileError(UserError):
    """An index folder that is missing, truncated, of another format or of another model."""


# ---------------------------------------------------------------------- index files
def read_manifest(index_dir):
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise IndexFileError(f"{index_dir} is not a retrieval index (no {MANIFEST}); build one with "
                          "python retrieve.py index ...")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise IndexFileError(f"{path} is unreadable ({error}); rebuild the index") from error
    if manifest.get("format") != INDEX_FORMAT or manifest.get("version") != INDEX_VERSION:
        raise IndexFileError(f"{index_dir} is not a version {INDEX_VERSION} {INDEX_FORMAT} "
                          f"(found {manifest.get('format')!r} version {manifest.get('version')!r})")
    return manifest


def load_index(index_dir):
    """(manifest, embeddings (N, D) in the stored dtype, label ids (N,), image paths [N]).

    The embeddings are copied chunk by chunk into one preallocated array, so loading holds
    the gallery once plus one chunk, never two copies."""
    manifest = read_manifest(index_dir)
    if not manifest["chunks"]:
        raise IndexFileError(f"{index_dir} holds no images")
    total = sum(chunk["count"] for chunk in manifest["chunks"])
    embeddings = labels = None
    paths, start = [], 0
    for chunk in manifest["chunks"]:
        path = Path(index_dir) / chunk["file"]
        try:
            with np.load(path) as data:
                part = data["embeddings"], data["labels"], data["paths"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise IndexFileError(f"{path}: truncated or unreadable index chunk ({error}); delete it "
                                 "and its entry in manifest.json, then re-run the `retrieve.py "
                                 "index` command that wrote it") from error
        if len(part[0]) != chunk["count"]:
            raise IndexFileError(f"{path}: holds {len(part[0])} images, the manifest says {chunk['count']}")
        if embeddings is None:
            embeddings = np.empty((total, part[0].shape[1]), dtype=part[0].dtype)
            labels = np.empty(total, dtype=np.int64)
        embeddings[start:start + len(part[0])] = part[0]
        labels[start:start + len(part[0])] = part[1]
        paths += [str(Path(chunk["root"]) / p) for p in part[2].tolist()]
        start += len(part[0])
    return manifest, embeddings, labels, paths


def write_npz(path, **arrays):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- optional faiss index
def import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise UserError("faiss is not installed: `pip install faiss-cpu` (or faiss-gpu), or "
                              "use the exact search (the default)") from error
    return faiss


FAISS_ADD_CHUNK = 65536  # rows converted to float32 per index.add


def build_faiss_index(index_dir, nlist):
    """An inverted-file index (faiss IndexIVFFlat, inner product) over the whole gallery, for
    galleries of many millions where the exact scan is too slow; approximate: a query searches
    only the --nprobe closest of the `nlist` clusters."""
    faiss = import_faiss()
    _, embeddings, _, _ = load_index(index_dir)
    if nlist > len(embeddings):
        raise UserError(f"--faiss-ivf {nlist}: more clusters than the {len(embeddings)} images")
    dim = embeddings.shape[1]
    quantizer = faiss.IndexFlatIP(dim)  # kept referenced until the index is written
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).permutation(len(embeddings))[:256 * nlist]  # faiss's own guideline
    index.train(np.ascontiguousarray(embeddings[np.sort(sample)], dtype=np.float32))
    # Rows go in as float32 chunks: the index is already a float32 copy of the gallery (10 GB at
    # 10^7 x 256), a second whole copy to feed it would not fit beside it on most machines.
    for start in range(0, len(embeddings), FAISS_ADD_CHUNK):
        index.add(np.ascontiguousarray(embeddings[start:start + FAISS_ADD_CHUNK], dtype=np.float32))
    tmp = Path(index_dir) / f".{FAISS_FILE}.tmp{os.getpid()}"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, Path(index_dir) / FAISS_FILE)
    return {"file": FAISS_FILE, "nlist": nlist, "count": len(embeddings)}


def faiss_search(index_dir, manifest, queries, k, nprobe):
    faiss = import_faiss()
    entry = manifest.get("faiss")
    total = sum(chunk["count"] for chunk in manifest["chunks"])
    if not entry or entry["count"] != total:
        raise UserError(f"{index_dir} has no up-to-date faiss index; build one with "
                              "`retrieve.py index ... --faiss-ivf NLIST`, or drop --search faiss")
    index = faiss.read_index(str(Path(index_dir) / entry["file"]))
    index.nprobe = nprobe
    scores, indices = index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
    if (indices < 0).any():  # the visited clusters held fewer than k images: faiss pads with -1
        print(f"warning: the {nprobe} clusters visited held fewer than {k} images for some queries; "
              "they get fewer neighbours (raise --nprobe)", file=sys.stderr)
    return torch.from_numpy(scores), torch.from_numpy(indices)


def chunk_paths(path):
    try:
        with np.load(path) as data:
            return data["paths"].tolist()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise IndexFileError(f"{path}: truncated or unreadable index chunk ({error}); delete it and "
                          "its entry in manifest.json, then re-run the same command") from error
