"""bench.py's data suite: the input pipeline, with and without the image cache, against the step.

    python bench.py data [--workers 0,1,2] [--full] [--phantom-size 1024] [--dataset-dir DIR]

Images/s of ImageListDataset + train.py's training transform through a DataLoader with PK batches,
measured alone, per worker count, for each source: the phantoms written as 8-bit PNGs and the
same images as 16-bit PNGs holding 12-bit data (or --dataset-dir's images), each read directly
(decode + resize every epoch) and through --cache-dir's pre-resized cache (image_cache.py) after
one untimed pass filled it, i.e. as from the second epoch on. Beside them: the training step rate
of train.py's default flags on this device (engine.train_step in its own process), and for the
paper model on a GPU the rate the train suite measured on an NVIDIA H200 (a stated reference, not
measured here on a CPU run). Files are in the page cache (no disk reads) for both paths.
"""
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cxr import bench_harness, bench_train, demo_dataset, image_cache, phantom, presets, train_args
from cxr.image_cache import ImageCache
from dataset import ImageListDataset, build_transform
from sampler import PKSampler

TARGET_CACHE_SPEEDUP = 5.0  # cached / uncached loader images/s per worker, 1024 px 8-bit PNGs
# The paper model's training step on one GPU, from this repository's train suite
# (BENCHMARKS.md, python bench.py train --device cuda --full, NVIDIA H200, 2026-11-30).
GPU_REFERENCE = {"gpu": "NVIDIA H200", "bf16": 150.5, "all": 135.2}
# A loader batch that takes longer than this is a stall (the suite once gave no output for 400 s
# on a GPU machine): it fails its row instead of holding up the suite.
BATCH_TIMEOUT_S = 60


def loader_rate(dataset, args, workers, batches, warmup, pin_memory, seconds=None):
    """(images/s, timed batches) of PK batches through a DataLoader built as train.py builds it.
    The timing stops after `seconds` (at least one batch), and with workers a batch that takes
    longer than BATCH_TIMEOUT_S raises instead of waiting for ever: a stall becomes a row."""
    sampler = PKSampler(dataset.targets.tolist(), args.labels_per_batch, args.samples_per_label,
                        batches_per_epoch=warmup + batches, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                        timeout=BATCH_TIMEOUT_S if workers else 0)
    iterator = iter(loader)
    # Untimed: worker start-up, and with at least one batch per worker every worker is busy
    # when the clock starts, so batches already in flight do not inflate the rate much.
    for _ in range(warmup):
        next(iterator)
    start, images, timed = time.perf_counter(), 0, 0
    for batch, _ in iterator:
        images += len(batch)
        timed += 1
        if seconds is not None and time.perf_counter() - start > seconds:
            break
    return images / (time.perf_counter() - start), timed


def sixteen_bit_copy(root, out):
    """The 8-bit data set at `root` rewritten as 16-bit PNGs holding 12-bit data (value x 16),
    with the same lists: the common format of exported radiographs, decoded and scaled by
    images.to_8bit on every read."""
    out.mkdir(parents=True)
    for name in ("train_split.txt",):
        (out / name).write_text((root / name).read_text())
    (out / "train").mkdir()
    for path in sorted((root / "train").glob("*.png")):
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), dtype=np.uint16) * 16
        Image.fromarray(grey).save(out / "train" / path.name)
    return out


def fill(dataset):
    """One untimed pass over every image, so the cache holds them all (the first epoch)."""
    for index in range(len(dataset)):
        dataset[index]


def run_data(args):
    device_type = torch.device(args.device).type
    argv, batches = bench_train.train_argv(args), bench_harness.steps_for(args, "data")
    config = train_args.parse_args(argv)
    workers = args.workers or [config.workers]
    transform = build_transform(config.img_size, True, config.rand_resize, config.hflip)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dataset_dir:
            root = Path(args.dataset_dir)
            image_list = Path(args.image_list) if args.image_list else root / "train_split.txt"
            sources = [(f"{root / 'train'} listed in {image_list.name}", root, image_list)]
        else:
            size = args.phantom_size or (1024 if args.full else presets.DEMO_DATA["size"])
            per_class = config.samples_per_label  # one batch's worth per label; reused across batches
            root = demo_dataset.write_demo_dataset(tmp / "phantoms", train_per_class=per_class,
                                                test_per_class=0, size=size)
            wide = sixteen_bit_copy(root, tmp / "phantoms16")
            count = per_class * len(phantom.CLASSES)
            sources = [(f"{count} phantoms, {size} px 8-bit PNG", root, root / "train_split.txt"),
                       (f"{count} phantoms, {size} px 16-bit PNG (12-bit data)", wide,
                        wide / "train_split.txt")]
        # The loader cases share --data-seconds of timing: each gets an equal part of what is left.
        started, cases = time.perf_counter(), len(sources) * 2 * len(workers)
        for name, folder, image_list in sources:
            for cached in (False, True):
                dataset = ImageListDataset(folder / "train", image_list, "covidx", transform=transform)
                if cached:
                    dataset.use_cache(ImageCache(tmp / "cache", config.img_size))
                    fill(dataset)
                for w in workers:
                    row = {"source": name, "cached": cached, "workers": w}
                    share = max(args.data_seconds - (time.perf_counter() - started), 0) / (cases - len(rows))
                    try:
                        row["images_per_s"], row["batches"] = loader_rate(
                            dataset, config, w, batches, max(args.warmup, w), device_type == "cuda", share)
                    except RuntimeError as error:  # a DataLoader timeout or a worker that died
                        row["error"] = str(error).splitlines()[0][:160].replace("|", "/")
                    rows.append(row)
                    outcome = row.get("error") or f"{row['images_per_s']:.1f} img/s over {row['batches']} batches"
                    print(f"[data {time.strftime('%H:%M:%S')}] {name}, {'cache' if cached else 'decode'}, "
                          f"{w} workers: {outcome}", flush=True)
    # The step users get from train.py's default flags on this device.
    default = frozenset({"fused"} | ({"bf16"} if config.amp == "bf16" else set())
                        | ({"channels_last"} if config.channels_last else set()))
    step = bench_harness.isolated(args.threads, bench_train.train_case, argv, default,
                                  bench_harness.steps_for(args, "train"), args.warmup)
    step_rate = step.get("images_per_s")
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["source"], "cache" if row["cached"] else "decode", row["workers"], "error", "",
                          "", "", "", "", row["error"]])
            continue
        plain = next((r.get("images_per_s") for r in rows if r["source"] == row["source"]
                      and r["workers"] == row["workers"] and not r["cached"]), None)
        row["speedup"] = row["images_per_s"] / plain if plain else None
        per_worker = row["images_per_s"] / max(row["workers"], 1)
        ratio = row["images_per_s"] / step_rate if step_rate else None
        target = verdict = ""
        if row["cached"] and "8-bit" in row["source"] and "1024 px" in row["source"]:
            target = f">= {TARGET_CACHE_SPEEDUP:g}x uncached"
            verdict = bench_harness.status(row["speedup"] is not None and row["speedup"] >= TARGET_CACHE_SPEEDUP)
        table.append([row["source"], "cache" if row["cached"] else "decode", row["workers"],
                      f"{row['images_per_s']:.1f}", f"{per_worker:.1f}", bench_harness.times(row["speedup"]),
                      bench_harness.fmt(step_rate), bench_harness.times(ratio), target, verdict])
    header = ["source", "read", "workers", "loader img/s", "per worker", "vs decode", "train step img/s",
              "loader / step", "target", "status"]
    reference = GPU_REFERENCE
    notes = [f"transform: train.py's (resize to {config.img_size} x {config.img_size}"
             f"{', flip' if config.hflip else ''}); P x K = {config.labels_per_batch} x "
             f"{config.samples_per_label}; {batches} timed batches after max(warmup, workers), or fewer "
             f"where the cases' {args.data_seconds:g} s of timing ran out; "
             f"cache: image_cache.py, {image_cache.SCALE} x img size square, filled by one untimed "
             "pass (the first epoch)",
             f"train step: {bench_train.config_note(config)}, train.py's default flags on {args.device} "
             f"({bench_train.variant_label(default)})" + (f"; failed: {step['error']}" if "error" in step else ""),
             f"paper model on one GPU for scale: {reference['bf16']} img/s with bf16, {reference['all']} "
             f"with every optimisation ({reference['gpu']}, this file's cuda train section); one worker "
             "must deliver that rate / the workers a node can spare"]
    model = "paper" if args.full else "demo"
    bench_harness.report(args, "data", f"data: input pipeline, decode vs cache, vs training step ({args.device}, "
                 f"{model} config)", bench_harness.markdown_table(header, table), notes)
    return [{**row, "train_images_per_s": step_rate} for row in rows]
