"""Cached augmented teacher views (`train.teacher_views`): speed, cache cost and half-precision error.

Side by side in one process, for each teacher (resnet20 and wrn_40_2 -> resnet8, Fashion-MNIST's 1x28x28, 10
classes, batch 128): images/s of ce, of kd reading K = 8 cached views, and of kd with augmentation and a teacher
forward every step (`distillab bench throughput`'s measurement, random weights: speed does not depend on them);
the cache's build time and size. Then the error of a half-precision store against float32 on the shipped resnet20
Fashion-MNIST teacher (fitnet's tap: its stage-2 map). Writes results/teacher_views/teacher_views.{json,md}.

    .venv/bin/python benchmarks/teacher_views.py          # about 10 minutes on the 2-core CPU; run it alone
    .venv/bin/python benchmarks/teacher_views.py --sizes  # each method's cache size: results/.../cache_sizes.md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from distillab.bench.throughput import ThroughputSpec, measure
from distillab.config_files import load_config
from distillab.data import load_splits
from distillab.data.loader import DeviceLoader
from distillab.engine.teacher_cache import build_teacher_cache, output_bytes
from distillab.run import build_method

VIEWS = 8
LEADERBOARD_IMAGES = 5_000  # the leaderboard v2 budget's training subset, for the projected cache size
OUT = Path("results/teacher_views")


def speed(teacher: str, console: Console) -> dict:
    common = dict(teacher=teacher, student="resnet8", input_shape=(1, 28, 28), num_classes=10, batch=128,
                  warmup=3, steps=10, repeats=3)
    cached = measure(ThroughputSpec(methods=["ce", "kd"], teacher_views=VIEWS, **common), console)
    plain = measure(ThroughputSpec(methods=["kd"], **common), console)
    ce, kd_cached, kd_plain = cached["methods"]["ce"], cached["methods"]["kd"], plain["methods"]["kd"]
    images = 128 * 13  # the images the measurement's cache covers (warm-up + timed steps)
    per_image = kd_cached["cache_mib"] * 2**20 / (VIEWS * images)
    return {
        "teacher": teacher, "environment": cached["environment"],
        "ce_images_per_s": ce["images_per_s"], "kd_cached_images_per_s": kd_cached["images_per_s"],
        "kd_uncached_images_per_s": kd_plain["images_per_s"],
        "bound_images_per_s": cached["bound"]["images_per_s"],
        "teacher_forward_images_per_s": cached["bound"]["before"]["teacher_forward"]["images_per_s"],
        "kd_cached_over_ce": kd_cached["images_per_s"] / ce["images_per_s"],
        "kd_cached_over_uncached": kd_cached["images_per_s"] / kd_plain["images_per_s"],
        "cache_build_s": kd_cached["cache_build_s"], "cache_mib": kd_cached["cache_mib"],
        "cache_images": images, "views": VIEWS, "cache_bytes_per_image_view": per_image,
        "build_images_per_s": VIEWS * images / kd_cached["cache_build_s"],
        "projected_leaderboard_cache_mib": per_image * VIEWS * LEADERBOARD_IMAGES / 2**20,
        "projected_leaderboard_build_s": VIEWS * LEADERBOARD_IMAGES * kd_cached["cache_build_s"] / (VIEWS * images),
        "drift": {"views_run": cached["bound"]["drift"], "plain_run": plain["bound"]["drift"]},
    }


def half_precision_error() -> dict:
    cfg = load_config("configs/fashion_mnist/fitnet.yaml", overrides=["data.train_subset=2000"],
                      layers=[Path("configs/fashion_mnist/_converged.yaml")])
    data = load_splits(cfg.data)
    method, _ = build_method(cfg, data)
    method.eval()
    loader = DeviceLoader(data.train, 256, shuffle=False, channels_last=True)
    method.to(memory_format=torch.channels_last)
    batches = lambda _: (b.images for b in loader)  # noqa: E731
    n = len(data.train)
    full = build_teacher_cache(method.teacher, method.teacher_taps, batches, 1, n, torch.no_grad)
    rows = torch.arange(n)
    out = {"images": n, "taps": [name for tap in method.teacher_taps for name in tap.names],
           "bytes_per_image_float32": sum(output_bytes(method.teacher, method.teacher_taps, method.input_shape,
                                                       None).values())}
    for dtype in (torch.float16, torch.bfloat16):
        half = build_teacher_cache(method.teacher, method.teacher_taps, batches, 1, n, torch.no_grad, dtype=dtype)
        errors = {}
        for name in full.outputs:
            a, b = full.rows(name, rows), half.rows(name, rows)
            errors[name] = {"max_abs": (a - b).abs().max().item(), "max_abs_value": a.abs().max().item(),
                            "rms_rel": ((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()}
        kd_t = torch.softmax(full.rows("logits", rows) / 4, 1)
        kd_h = torch.softmax(half.rows("logits", rows) / 4, 1)
        errors["softmax_T4_max_abs"] = (kd_t - kd_h).abs().max().item()
        errors["argmax_agreement"] = (full.rows("logits", rows).argmax(1) == half.rows("logits", rows).argmax(1)
                                      ).float().mean().item()
        out[str(dtype).removeprefix("torch.")] = errors
    return out


def cache_sizes() -> list[dict]:
    """Bytes per image and view of every method's cache (logits + the teacher features it taps; dry shapes, no
    data), resnet20 and wrn_40_2 teachers, resnet8 student, 1x28x28, 10 classes."""
    from distillab import methods, models
    from distillab.config import TrainConfig
    from distillab.engine.trainer import cacheable

    options = {"dfa": {"mode": "last", "fd_weight": 1}, "crd": {"num_negatives": 16}}
    rows = []
    for teacher in ("resnet20", "wrn_40_2"):
        for name, cls in sorted(methods.available().items()):
            if not cls.requires_teacher:
                continue
            torch.manual_seed(0)
            method = methods.build(name, models.build("resnet8", 10, 1), models.build(teacher, 10, 1),
                                   input_shape=(1, 28, 28), **options.get(name, {}))
            size = (sum(output_bytes(method.teacher, method.teacher_taps, method.input_shape, None).values())
                    if cacheable(method, TrainConfig()) else None)
            rows.append({"teacher": teacher, "method": name, "bytes_per_image_view": size})
    return rows


def sizes_table(rows: list[dict]) -> str:
    lines = ["| method | resnet20: bytes / image / view | 5k images x 8 views | wrn_40_2: bytes / image / view | "
             "5k images x 8 views |", "|---|---:|---:|---:|---:|"]
    by = {(r["teacher"], r["method"]): r["bytes_per_image_view"] for r in rows}
    for name in sorted({r["method"] for r in rows}):
        cells = []
        for teacher in ("resnet20", "wrn_40_2"):
            b = by[(teacher, name)]
            size = "-" if b is None else f"{b * 8 * LEADERBOARD_IMAGES / 2**20:,.0f} MiB"
            cells += ["not cacheable" if b is None else f"{b:,}", size]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(result: dict) -> str:
    lines = ["| teacher | ce img/s | kd, 8 cached views | kd, augmented, teacher each step | bound | kd cached / ce "
             "| cache build (8 x 1,664 images) | cache bytes / image / view | projected 5k x 8 views |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["speed"]:
        lines.append(f"| {r['teacher']} | {r['ce_images_per_s']:,.0f} | {r['kd_cached_images_per_s']:,.0f} | "
                     f"{r['kd_uncached_images_per_s']:,.0f} | {r['bound_images_per_s']:,.0f} | "
                     f"{r['kd_cached_over_ce']:.2f} | {r['cache_build_s']:.1f} s ({r['build_images_per_s']:,.0f} "
                     f"img/s) | {r['cache_bytes_per_image_view']:,.0f} | "
                     f"{r['projected_leaderboard_cache_mib']:,.1f} MiB, {r['projected_leaderboard_build_s']:,.0f} s |")
    env = result["speed"][0]["environment"]
    lines.append(f"\n{env['device']}, {env['threads']} threads, {env['cpu_capability']}, torch {env['torch']}; "
                 "median of 3 x 10 steps after 3 warm-up; bound drift " + ", ".join(
                     f"{r['teacher']} {r['drift']['views_run']:+.1%}/{r['drift']['plain_run']:+.1%}"
                     for r in result["speed"]))
    h = result["half_precision"]
    lines.append(f"\nHalf-precision store, shipped resnet20 teacher, {h['images']:,} Fashion-MNIST images, taps "
                 f"{', '.join(h['taps'])} ({h['bytes_per_image_float32']:,} bytes per image in float32):\n")
    lines.append("| store | output | max abs error | max abs value | RMS relative error |")
    lines.append("|---|---|---:|---:|---:|")
    for dtype in ("float16", "bfloat16"):
        for name, e in h[dtype].items():
            if isinstance(e, dict):
                lines.append(f"| {dtype} | {name} | {e['max_abs']:.3g} | {e['max_abs_value']:.3g} | "
                             f"{e['rms_rel']:.2e} |")
        lines.append(f"| {dtype} | softmax(logits / 4), max abs | {h[dtype]['softmax_T4_max_abs']:.2e} | | |")
        lines.append(f"| {dtype} | argmax agreement | {h[dtype]['argmax_agreement']:.4f} | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    console = Console()
    started = time.perf_counter()
    if sys.argv[1:] == ["--sizes"]:  # the cache sizes only (no timing: safe beside other work)
        rows = cache_sizes()
        (OUT / "cache_sizes.md").write_text(sizes_table(rows))
        console.print(sizes_table(rows))
        return 0
    result = {"speed": [speed(t, console) for t in ("resnet20", "wrn_40_2")], "half_precision": half_precision_error()}
    result["wall_s"] = time.perf_counter() - started
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "teacher_views.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "teacher_views.md").write_text(table(result))
    console.print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
