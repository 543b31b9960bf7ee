"""Inference latency of RDR's exported student against the plain student, on this CPU.

RDR trains K parallel branches in place of one conv(+BN) and merges them for deployment, so the exported
student should cost exactly what the plain student costs. This measures it: the plain zoo student, RDR's
exported student (`deploy()`, branches merged), the same with `fuse_bn` (merged layer as one biased
conv), and, for reference, the unmerged multi-branch training student in eval mode. All get the same batch,
warm-up passes, then repeated timed passes in alternation (so background load hits all alike); the median is
reported, with the ratios to the plain student.

    python benchmarks/rdr_latency.py --out results/rdr_latency.json
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
from rich.console import Console
from rich.table import Table

import distillab
from distillab import methods, models
from distillab.engine.trainer import device_name


def parse_shape(text: str) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in text.lower().split("x"))
    return c, h, w


def variants(student: str, teacher: str, k: int, shape: tuple[int, int, int], num_classes: int) -> dict:
    """The networks to time, in eval mode: plain, exported, exported with fuse_bn, multi-branch."""
    torch.manual_seed(0)
    plain = models.build(student, num_classes=num_classes, in_channels=shape[0])
    t = models.build(teacher, num_classes=num_classes, in_channels=shape[0])
    method = methods.build("rdr", copy.deepcopy(plain), t, input_shape=shape, K=k)
    fused = methods.build("rdr", copy.deepcopy(plain), t, input_shape=shape, K=k, fuse_bn=True)
    fused.load_trainable_state_dict(method.trainable_state_dict())
    nets = {"plain": plain, "exported": method.deploy(), "exported_fuse_bn": fused.deploy(),
            "multi_branch": method.student}
    for net in nets.values():
        net.eval()
    return nets


@torch.no_grad()
def time_once(net: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    net(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--teacher", default="resnet32x4", help="only its feature shape matters here")
    parser.add_argument("--K", type=int, default=4)
    parser.add_argument("--input", default="3x32x32", help="CxHxW")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="untimed passes per network")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per network (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("results/rdr_latency.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    shape = parse_shape(args.input)
    nets = variants(args.student, args.teacher, args.K, shape, args.num_classes)
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(1))
    for net in nets.values():
        for _ in range(args.warmup):
            time_once(net, x)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.repeats):
        for name, net in nets.items():
            times[name].append(time_once(net, x))
    with torch.no_grad():
        agree = float((nets["exported"](x) - nets["multi_branch"](x)).abs().max())
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "student": args.student, "K": args.K, "input": list(shape), "batch": args.batch,
        "warmup": args.warmup, "repeats": args.repeats,
        "params": {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()},
        "median_ms": {name: 1000 * value for name, value in median.items()},
        "ratio_to_plain": {name: value / median["plain"] for name, value in median.items()},
        "exported_vs_multi_branch_max_abs_diff": agree,
        "environment": {"torch": torch.__version__, "distillab": distillab.__version__,
                        "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
                        "load_average": list(os.getloadavg()), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"{args.student}, RDR K={args.K}: batch {args.batch} x {args.input}, "
                        f"median of {args.repeats} ({args.threads} threads)")
    for col in ("network", "parameters", "median ms", "ratio to plain"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for name in nets:
        table.add_row(name, f"{result['params'][name]:,}", f"{result['median_ms'][name]:.2f}",
                      f"{result['ratio_to_plain'][name]:.3f}")
    console = Console()
    console.print(table)
    console.print(f"exported vs multi-branch logits: max abs diff {agree:.2e}; written {args.out}")


if __name__ == "__main__":
    main()
