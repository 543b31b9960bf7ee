"""Training cost of DiffKD against KD for resnet32x4 -> resnet8x4 at 3x32x32 (CIFAR-100), on random tensors.

Throughput: one training step (forward, backward, SGD update) of each method object, timed in alternation in
one process (so background load affects both alike); several repetitions, median images/s.
FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward + backward of one training step; the extra
FLOPs of the DiffKD side modules are the diffkd step minus the kd step (both run the teacher forward and the
student forward + backward; the counter counts matmuls and convolutions, not BN or element-wise ops).

    python benchmarks/diffkd_cost.py --out results/diffkd_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from distillab import methods, models

TEACHER, STUDENT, NUM_CLASSES, IMAGE = "resnet32x4", "resnet8x4", 100, (3, 32, 32)


def build(name: str, teacher: torch.nn.Module, student: torch.nn.Module, **options) -> tuple:
    """A method on its own copies of the networks (so one method's taps never fire in the other's steps)."""
    method = methods.build(name, copy.deepcopy(student), copy.deepcopy(teacher), **options).train()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                                weight_decay=5e-4)
    return method, optimizer


def train_step(method, optimizer, images, labels) -> None:
    _, terms = method(images, labels)
    optimizer.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    optimizer.step()


def step_flops(method, images, labels) -> int:
    """Counted FLOPs of forward + backward of one training step (the optimizer update is not counted)."""
    with FlopCounterMode(display=False) as counter:
        _, terms = method(images, labels)
        sum(terms.values()).backward()
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method per repetition")
    parser.add_argument("--reps", type=int, default=7, help="alternating repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("results/diffkd_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = models.build(TEACHER, num_classes=NUM_CLASSES).eval()
    student = models.build(STUDENT, num_classes=NUM_CLASSES)
    images = torch.randn(args.batch_size, *IMAGE)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,))
    runs = {"kd": build("kd", teacher, student), "diffkd": build("diffkd", teacher, student)}

    flops = {name: step_flops(method, images, labels) for name, (method, _) in runs.items()}
    for branch in ("feature", "logits"):  # one branch alone, to split the extra cost
        only, _ = build("diffkd", teacher, student, feature=branch == "feature", logits=branch == "logits")
        flops[f"diffkd_{branch}_only"] = step_flops(only, images, labels)
    with FlopCounterMode(display=False) as counter:
        student.eval()(images)
    per_image = {name: value / args.batch_size for name, value in flops.items()}

    load_before = os.getloadavg()
    for method, optimizer in runs.values():  # warm-up
        train_step(method, optimizer, images, labels)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            method, optimizer = runs[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(method, optimizer, images, labels)
            seconds[name].append(time.perf_counter() - start)
    ips = {name: [args.steps * args.batch_size / s for s in times] for name, times in seconds.items()}
    median = {name: statistics.median(values) for name, values in ips.items()}

    result = {
        "pair": f"{TEACHER} -> {STUDENT}", "input": list(IMAGE), "num_classes": NUM_CLASSES,
        "batch_size": args.batch_size, "steps_per_rep": args.steps, "reps": args.reps,
        "images_per_s_median": median, "images_per_s_all": ips,
        "diffkd_over_kd_time": median["kd"] / median["diffkd"],
        "train_step_gflops_per_image": {k: v / 1e9 for k, v in per_image.items()},
        "diffkd_extra_train_gflops_per_image": (per_image["diffkd"] - per_image["kd"]) / 1e9,
        "diffkd_extra_train_gflops_per_image_by_branch": {
            b: (per_image[f"diffkd_{b}_only"] - per_image["kd"]) / 1e9 for b in ("feature", "logits")},
        "student_inference_gflops_per_image": counter.get_total_flops() / args.batch_size / 1e9,
        "side_parameters": runs["diffkd"][0].side_parameter_count(),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine(), "threads": args.threads,
                        "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "command": "python benchmarks/diffkd_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("images_per_s_median", "diffkd_over_kd_time",
                                             "train_step_gflops_per_image", "diffkd_extra_train_gflops_per_image",
                                             "diffkd_extra_train_gflops_per_image_by_branch")}, indent=2))


if __name__ == "__main__":
    main()
