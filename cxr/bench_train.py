"""bench.py train and embed: training steps and embedding extraction of train.py's demo or
paper configuration, plain against each optimisation and all of them, and the MFU on CUDA."""
import tempfile
import time
from pathlib import Path

import torch

from cxr import engine, recipe, train_args
from cxr.bench_harness import (
    MB,
    TARGETS,
    fmt,
    isolated,
    markdown_table,
    peak_memory,
    report,
    status,
    steps_for,
    sync,
    times,
)
from cxr.embeddings import extract_embeddings
from cxr.flops import training_flops_per_image
from cxr.onnx_export import export_onnx, preprocessing
from cxr.runtime import Runtime
from model import build_model

OPTIMISATIONS = ("bf16", "channels_last", "fused", "checkpointing", "compile")


LABELS = {"bf16": "+bf16", "channels_last": "+channels-last", "fused": "+fused",
          "checkpointing": "+checkpointing", "compile": "+compile"}


# On CPU an optimisation joins the "optimised" combination when its own row beats plain by this
# factor; below it the difference is within the run-to-run noise of a shared machine.
HELPS = 1.05


# --------------------------------------------------------------------------------------------
# Model set-up and variants, shared by embed, train and data
# --------------------------------------------------------------------------------------------
def train_argv(args):
    """train.py flags for the benchmarked configuration: the demo one, or the paper's with --full."""
    argv = ["--dataset", "covid" if args.full else "demo", "--no-pretrained", "--device", args.device]
    for flag, value in (("--img-size", args.img_size), ("--labels-per-batch", args.labels_per_batch),
                        ("--samples-per-label", args.samples_per_label),
                        ("--eval-batch-size", args.batch_size)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def variant_argv(variant):
    """train.py flags of a variant."""
    argv = ["--amp", "bf16" if "bf16" in variant else "none",
            "--channels-last" if "channels_last" in variant else "--no-channels-last",
            "--fused-optimizer" if "fused" in variant else "--no-fused-optimizer"]
    argv += ["--grad-checkpointing"] if "checkpointing" in variant else []
    argv += ["--compile"] if "compile" in variant else []
    return argv


def variant_label(variant):
    return " ".join(LABELS[name] for name in OPTIMISATIONS if name in variant) or "plain"


def config_note(config):
    return (f"model: {config.convnext_name} + {config.vit_name}, {config.img_size} px, "
            f"embedding {config.embedding_dim}")


def make_model(args, device):
    torch.manual_seed(0)  # the same weights in every process, so the variants are comparable
    model = build_model(args.model, args.embedding_dim, args.img_size, args.convnext_name,
                        args.vit_name, pretrained=False, grad_checkpointing=args.grad_checkpointing)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def synthetic_images(n, size, device):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=generator).to(device)  # contiguous, as loaded


def ablation(measure, names, device):
    """Measure plain, each optimisation alone, all of them, plain again, then the optimised set.

    Returns a dict: "results" {variant: result}, "optimised" (a variant), "plain_again" and
    "reference", the faster plain run, which every ratio is taken against: when the machine's
    load changes during the run, speed-ups are understated rather than invented. Optimised is
    everything on CUDA; on CPU the optimisations whose own row beat plain by HELPS, since several
    of them hurt there.
    """
    plain = frozenset()
    results = {plain: measure(plain)}
    for name in names:
        results[frozenset({name})] = measure(frozenset({name}))
    everything = frozenset(names)
    if everything not in results:
        results[everything] = measure(everything)
    again = measure(plain)
    reference = max(results[plain], again, key=lambda result: result.get("images_per_s", 0.0))
    optimised = everything
    if device.type == "cpu":
        base = reference.get("images_per_s")
        optimised = frozenset(name for name in names if base and
                              results[frozenset({name})].get("images_per_s", 0.0) >= HELPS * base)
    if optimised not in results:
        results[optimised] = measure(optimised)
    return {"results": results, "optimised": optimised, "plain_again": again, "reference": reference}


def ablation_rows(runs, names):
    """(label, result, is the optimised row) for every measured variant, then the optimised one."""
    rows = []
    for variant, result in runs["results"].items():
        label = variant_label(variant)
        rows.append((f"all: {label}" if len(variant) == len(names) > 1 else label, result, False))
    rows.append(("plain, again", runs["plain_again"], False))
    optimised = runs["optimised"]
    # When nothing helped, optimised is plain itself: its faster run.
    result = runs["results"][optimised] if optimised else runs["reference"]
    rows.append((f"optimised = {variant_label(optimised)}", result, True))
    return rows


def ablation_notes(runs, device):
    notes = []
    if device.type == "cpu":
        notes.append(f"optimised on this CPU: {variant_label(runs['optimised'])} (each optimisation "
                     f"whose own row beat plain by >= {HELPS - 1:.0%})")
    first = runs["results"][frozenset()].get("images_per_s")
    again = runs["plain_again"].get("images_per_s")
    if first and again and abs(first - again) > 0.1 * max(first, again):
        notes.append(f"plain ran at {first:.1f} and {again:.1f} img/s at the start and the end: the "
                     "machine's load changed during the run; ratios (against the faster) are unreliable")
    return notes


def speedup(result, reference):
    if "error" in result or "error" in reference:
        return None
    return result["images_per_s"] / reference["images_per_s"]


# --------------------------------------------------------------------------------------------
# embed: embedding extraction
# --------------------------------------------------------------------------------------------
def embed_case(argv, variant, steps, warmup):
    """Embed `steps` synthetic batches with embeddings.extract_embeddings, after `warmup` untimed ones."""
    args = train_args.parse_args(argv + variant_argv(variant))
    device = torch.device(args.device)
    model = make_model(args, device)
    if args.compile:
        model = torch.compile(model)
    images = synthetic_images(args.eval_batch_size, args.img_size, device)
    batch = (images, torch.zeros(len(images), dtype=torch.long))
    runtime = Runtime(device)
    if warmup:
        extract_embeddings(model, [batch] * warmup, runtime, args.amp, args.channels_last,
                                 progress=False)
    sync(device)
    start = time.perf_counter()
    embeddings, _ = extract_embeddings(model, [batch] * steps, runtime, args.amp,
                                             args.channels_last, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    # numpy, not a tensor: torch would send a tensor back through shared memory owned by this
    # process, which exits right after.
    return {"images_per_s": steps * len(images) / seconds,
            "embeddings": embeddings[:len(images)].cpu().numpy()}


def onnxruntime_case(argv, steps, warmup, folder):
    """The same model (the same weights) exported to ONNX and run by onnxruntime on the CPU: what a
    deployment without PyTorch gets."""
    import onnxruntime  # here: an optional package, needed only for this row

    args = train_args.parse_args(argv + variant_argv(()))
    model = make_model(args, torch.device("cpu"))
    description = {"preprocessing": preprocessing(vars(args), None)}
    path = export_onnx(model, description, Path(folder) / "bench.onnx")
    options = onnxruntime.SessionOptions()
    if torch.get_num_threads():
        options.intra_op_num_threads = torch.get_num_threads()  # the case's --threads, as torch's rows
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = synthetic_images(args.eval_batch_size, args.img_size, torch.device("cpu")).numpy()
    for _ in range(warmup):
        session.run(None, {"images": images})
    start = time.perf_counter()
    for _ in range(steps):
        embeddings = session.run(None, {"images": images})[0]
    return {"images_per_s": steps * len(images) / (time.perf_counter() - start), "embeddings": embeddings}


def run_embed(args):
    device = torch.device(args.device)
    argv, steps = train_argv(args), steps_for(args, "embed")
    config = train_args.parse_args(argv)
    names = ["bf16", "channels_last"] + (["compile"] if args.compile else [])
    runs = ablation(lambda variant: isolated(args.threads, embed_case, argv, variant, steps, args.warmup),
                    names, device)
    plain = runs["results"][frozenset()]
    rows = list(ablation_rows(runs, names))
    if device.type == "cpu":
        with tempfile.TemporaryDirectory() as folder:
            result = isolated(args.threads, onnxruntime_case, argv, steps, args.warmup, folder)
        rows.append(("onnxruntime (CPU, fp32, ONNX export of the same weights)", result, False))
    table = []
    for label, result, optimised in rows:
        if "error" in result:
            table.append([label, config.eval_batch_size, "error", "", "", "", result["error"]])
            continue
        ratio = speedup(result, runs["reference"])
        cosine = None
        if "error" not in plain:  # embeddings are unit vectors: the row-wise dot product
            cosine = float((result["embeddings"] * plain["embeddings"]).sum(1).min())
        target = verdict = ""
        if optimised and device.type == "cuda" and args.full:
            target = f">= {TARGETS['embed_gpu_speedup']:g}x plain"
            verdict = status(ratio is not None and ratio >= TARGETS["embed_gpu_speedup"])
        table.append([label, config.eval_batch_size, f"{result['images_per_s']:.1f}", times(ratio),
                      fmt(cosine, ".5f"), target, verdict])
    header = ["variant", "batch", "img/s", "vs plain", "min cos", "target", "status"]
    notes = [f"{config_note(config)}; embeddings.extract_embeddings (inference mode) over {steps} "
             f"batches of random images already on the device, after {args.warmup} warm-up",
             *ablation_notes(runs, device)]
    model = "paper" if args.full else "demo"
    report(args, "embed", f"embed: embedding extraction ({args.device}, {model} model)",
           markdown_table(header, table), notes)
    measured = [{"variant": variant_label(v), "optimised": v == runs["optimised"],
                 **{key: value for key, value in r.items() if key != "embeddings"}}
                for v, r in runs["results"].items()]
    if device.type == "cpu":
        measured.append({"variant": "onnxruntime", "optimised": False,
                         **{key: value for key, value in rows[-1][1].items() if key != "embeddings"}})
    return measured


# --------------------------------------------------------------------------------------------
# train: training steps
# --------------------------------------------------------------------------------------------
def pk_batch(args, device):
    p, k = args.labels_per_batch, args.samples_per_label
    images = synthetic_images(p * k, args.img_size, device)
    labels = torch.arange(p, device=device).repeat_interleave(k)  # P labels x K images
    return images, labels


def training_setup(args, device):
    """train.py's model, loss, optimiser, scheduler and scaler for the configuration `args`."""
    model = make_model(args, device)
    criterion = recipe.build_criterion(args, args.labels_per_batch).to(device)
    objective = recipe.ModelWithLoss(torch.compile(model) if args.compile else model, criterion,
                                    device, args.amp)
    optimizer = recipe.build_optimizer(objective, args, device)
    scheduler = recipe.build_scheduler(optimizer, args, steps_per_epoch=100)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return objective, optimizer, scheduler, scaler


def train_case(argv, variant, steps, warmup):
    """`warmup` untimed, then `steps` timed training steps (engine.train_step) of one variant on
    one fixed PK batch. variant None: only create the batch (the baseline of the host memory)."""
    args = train_args.parse_args(argv + variant_argv(variant or ()))
    device = torch.device(args.device)
    images, labels = pk_batch(args, device)
    if variant is None:
        return {}
    objective, optimizer, scheduler, scaler = training_setup(args, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = images.to(memory_format=memory_format)
    objective.train()

    def step():
        return engine.train_step(objective, optimizer, scheduler, scaler, images, labels, args)[0]

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync(device)
    seconds = time.perf_counter() - start
    result = {"images_per_s": steps * len(images) / seconds, "losses": torch.stack(losses).tolist()}
    if device.type == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    return result


PROFILE_ROWS = 15


def profile_case(argv, variant, warmup):
    """The operators that take the time of one training step of `variant` (torch.profiler after
    `warmup` steps): the top PROFILE_ROWS by self time on the device (CUDA kernels on a GPU)."""
    args = train_args.parse_args(argv + variant_argv(variant))
    device = torch.device(args.device)
    images, labels = pk_batch(args, device)
    objective, optimizer, scheduler, scaler = training_setup(args, device)
    images = images.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    objective.train()
    for _ in range(warmup):
        engine.train_step(objective, optimizer, scheduler, scaler, images, labels, args)
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        engine.train_step(objective, optimizer, scheduler, scaler, images, labels, args)
        sync(device)
    on_device = device.type == "cuda"
    events = [e for e in profiler.key_averages()
              if (e.self_device_time_total if on_device else e.self_cpu_time_total) > 0]
    self_us = [(e.self_device_time_total if on_device else e.self_cpu_time_total) for e in events]
    total = sum(self_us)
    order = sorted(range(len(events)), key=lambda i: -self_us[i])[:PROFILE_ROWS]
    return {"rows": [{"name": events[i].key[:90].replace("|", "/"), "self_ms": self_us[i] / 1000,
                      "share": self_us[i] / total, "calls": events[i].count} for i in order],
            "total_ms": total / 1000, "where": "GPU kernels" if on_device else "CPU operators"}


def profile_report(args, argv, variant):
    """bench.py train --profile: the profile of the optimised variant's step, as its own section."""
    result = isolated(args.threads, profile_case, argv, variant, args.warmup)
    if "error" in result:
        table = markdown_table(["operator", "error"], [["", result["error"]]])
    else:
        table = markdown_table(["operator", "self ms", "share", "calls"],
                               [[r["name"], f"{r['self_ms']:.2f}", f"{r['share']:.1%}", r["calls"]]
                                for r in result["rows"]])
    notes = [f"variant: {variant_label(variant)}; one step after {args.warmup} warm-up steps; self time of each "
             f"operator, {result.get('where', '')} (total {fmt(result.get('total_ms'), '.1f')} ms)"]
    model = "paper" if args.full else "demo"
    report(args, "train", f"train: where one step's time goes ({args.device}, {model} model)", table, notes)
    return result


def flops_case(argv):
    """Model FLOPs per training image (3 x the forward pass, cxr/flops.py) and the GPU's measured
    bf16 matmul peak (FLOP/s)."""
    args = train_args.parse_args(argv + variant_argv(()))
    device = torch.device(args.device)
    model = make_model(args, device)
    flops_per_image = training_flops_per_image(model, args.img_size, device)
    del model

    n, repeats = 8192, 100
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(10):  # clocks up, kernel chosen
        torch.mm(a, b, out=c)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=c)
    sync(device)
    peak = 2 * n**3 * repeats / (time.perf_counter() - start)
    return {"flops_per_image": flops_per_image, "peak_flops": peak}


def run_train(args):
    device = torch.device(args.device)
    argv, steps = train_argv(args), steps_for(args, "train")
    config = train_args.parse_args(argv)
    batch = config.labels_per_batch * config.samples_per_label
    names = ["bf16", "channels_last", "fused", "checkpointing"] + (["compile"] if args.compile else [])
    baseline = {}
    if device.type == "cpu":
        baseline = isolated(args.threads, train_case, argv, None, steps, args.warmup)
    runs = ablation(lambda variant: isolated(args.threads, train_case, argv, variant, steps, args.warmup),
                    names, device)
    flops = isolated(args.threads, flops_case, argv) if device.type == "cuda" else {}
    with_mfu = "flops_per_image" in flops

    table = []
    for label, result, optimised in ablation_rows(runs, names):
        if "error" in result:
            table.append([label, "error", "", "", "", "", *([""] if with_mfu else []), "", result["error"]])
            continue
        ratio = speedup(result, runs["reference"])
        memory = peak_memory(result, baseline, device)
        mfu = result["images_per_s"] * flops["flops_per_image"] / flops["peak_flops"] if with_mfu else None
        target = verdict = ""
        if optimised and device.type == "cpu":
            target = f">= {TARGETS['train_cpu_speedup']:g}x plain"
            verdict = status(ratio is not None and ratio >= TARGETS["train_cpu_speedup"])
        elif optimised and args.full:
            goals = [f">= {TARGETS['train_gpu_speedup']:g}x plain", f"MFU >= {TARGETS['train_gpu_mfu']:.0%}"]
            met = (ratio is not None and ratio >= TARGETS["train_gpu_speedup"]
                   and mfu is not None and mfu >= TARGETS["train_gpu_mfu"])
            if batch == TARGETS["train_gpu_batch"]:
                goals.append(f"<= {TARGETS['train_gpu_bytes'] / MB:.0f} MB")
                met = met and memory is not None and memory <= TARGETS["train_gpu_bytes"]
            target, verdict = ", ".join(goals), status(met)
        losses = result["losses"]
        table.append([label, f"{result['images_per_s']:.1f}", f"{1000 * batch / result['images_per_s']:.0f}",
                      times(ratio), fmt(memory, ".0f", MB), f"{sum(losses) / len(losses):.4f}",
                      *([fmt(mfu, ".1%")] if with_mfu else []), target, verdict])
    header = ["variant", "img/s", "ms/step", "vs plain", "peak MB", "loss", *(["MFU"] if with_mfu else []),
              "target", "status"]
    notes = [f"{config_note(config)}, P x K = {config.labels_per_batch} x {config.samples_per_label} "
             f"= {batch}, recipe {config.recipe} ({config.mining} triplet, identity loss x "
             f"{config.id_loss_weight:g}, neck {config.neck}); {steps} timed steps after {args.warmup} warm-up; "
             "random weights and images", *ablation_notes(runs, device)]
    if with_mfu:
        notes.append(f"model FLOPs per training image: {flops['flops_per_image'] / 1e9:.1f} G; "
                     f"measured bf16 matmul peak: {flops['peak_flops'] / 1e12:.0f} TFLOP/s")
    elif device.type == "cuda":
        notes.append(f"FLOP count / matmul peak failed: {flops['error']}")
    model = "paper" if args.full else "demo"
    report(args, "train", f"train: training steps ({args.device}, {model} model)",
           markdown_table(header, table), notes)
    if args.profile:
        profile_report(args, argv, runs["optimised"])
    return [{"variant": variant_label(v), "optimised": v == runs["optimised"], **r}
            for v, r in runs["results"].items()]
