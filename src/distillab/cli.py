"""The `distillab` command: parses arguments, calls the library, prints errors as one line."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rich.table import Table

from distillab.console import make_console
from distillab.errors import DistillabError, DistillabWarning

CLOSED_PIPE = 141  # 128 + SIGPIPE: the status of a process a closed pipe ends, as the shell reports it


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status. Output into a pipe closed
    early (`distillab configs list | head -1`) ends the command quietly with status 141, as a program the
    SIGPIPE signal stops: no traceback, nothing on stderr."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a message at exit
    except BrokenPipeError:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)  # what is still buffered for stdout goes nowhere at exit
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return CLOSED_PIPE


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from distillab.engine.trainer import TrainingStopped

    warnings.showwarning = _show_warning
    try:
        return args.func(args) or 0
    except TrainingStopped as exc:
        print(f"distillab: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except DistillabError as exc:
        if args.debug:
            raise
        from distillab.engine.distributed import world_from_env

        if world_from_env().is_main:  # under torchrun every rank fails alike: rank 0 says it once
            print(f"distillab: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distillab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # main's to handle: no error message into a closed pipe
    except (OSError, MemoryError) as exc:  # the machine's, not the input's: still one line (--debug: traceback)
        if args.debug:
            raise
        what = "out of memory" if isinstance(exc, MemoryError) else (exc.strerror or str(exc)).lower()
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"distillab: error: {one_line(what)}{where}", file=sys.stderr)
        return 2


_show_python_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """distillab's own warnings as one `distillab: warning:` line; any other the usual way."""
    if issubclass(category, DistillabWarning):
        print(f"distillab: warning: {one_line(str(message))}", file=file or sys.stderr)
    else:
        _show_python_warning(message, category, filename, lineno, file, line)


def one_line(text: str) -> str:
    """An error message on one line, whatever it quotes (YAML marks, nested messages)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillab", description="Knowledge distillation for vision models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a run from a YAML config")
    p.add_argument("config", nargs="?", type=Path, help="YAML run config (optional with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run in place")
    p.add_argument("--budget", type=Path, metavar="FILE",
                   help="a config file laid over the config (e.g. configs/fashion_mnist/_converged.yaml)")
    p.add_argument("--force", action="store_true", help="start an existing run directory again from scratch")
    _allow_code_flag(p)
    _debug_flag(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("search", help="(gone) DFA's search is now a stage of `distillab train`")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_search)

    p = sub.add_parser("convert", help="weights in another layout (RepDistiller, mdistiller) as a zoo safetensors file")
    p.add_argument("input", type=Path, help="a .pth/.pt checkpoint, a .safetensors file or a run directory")
    p.add_argument("output", type=Path, help="the .safetensors file to write")
    p.add_argument("--model", required=True, help="the zoo model the weights are for, e.g. resnet32x4")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _debug_flag(p)
    p.set_defaults(func=_convert)

    p = sub.add_parser("eval", help="test accuracy of a run's deployed network (as export writes it), rebuilt from "
                       "its last checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's config (e.g. data.root)")
    _allow_code_flag(p)
    _debug_flag(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a run's deployed network (the method's: RDR merges its branches, SimKD "
                       "adds the teacher's classifier) with its model card, as safetensors, ONNX or a torch.export "
                       "program")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=["safetensors", "onnx", "torch-export"], default="safetensors",
                   help="safetensors: weights (rebuilt by distillab.export.load_exported); onnx, torch-export: the "
                   "graph too, with a dynamic batch dimension")
    p.add_argument("--output", type=Path, help="file to write (default RUN_DIR/exported_student.<ext>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's config (e.g. method.options.fuse_bn=true, data.root)")
    p.add_argument("--force", action="store_true", help="replace an existing output file (never one of a run's own)")
    _allow_code_flag(p)
    _debug_flag(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("demo", help="train a teacher and distil students on scikit-learn's digits (~1 min)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--seeds", type=int, default=3, help="student runs per method")
    p.add_argument("--force", action="store_true", help="train the demo's runs again (finished ones are reused)")
    _debug_flag(p)
    p.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks: multi-seed suites").add_subparsers(
        dest="bench_command", metavar="BENCH", required=True)
    p = bench.add_parser("suite", help="run every entry of a suite file for N seeds (after its tuning grids); "
                                       "table, paired differences and figures into results/")
    p.add_argument("suite", type=Path)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--only", help="comma-separated labels to train now (the table shows every finished run)")
    p.add_argument("--no-train", dest="train", action="store_false",
                   help="train nothing: write the table of the runs finished so far")
    _debug_flag(p)
    p.set_defaults(func=_bench_suite)

    p = bench.add_parser("tune", help="run a suite's tuning grids on the validation split and show the choice")
    p.add_argument("suite", type=Path)
    p.add_argument("--only", help="comma-separated labels whose grids to run")
    _debug_flag(p)
    p.set_defaults(func=_bench_tune)

    p = bench.add_parser("throughput", help="training images/s of methods against the bound "
                                            "(student step + teacher forward)")
    p.add_argument("--teacher", required=True, help="zoo name of the teacher")
    p.add_argument("--student", required=True, help="zoo name of the student")
    p.add_argument("--methods", default="kd", help="comma-separated method names, or 'all' (default: kd)")
    p.add_argument("--input", default="3x32x32", help="image shape CxHxW (default 3x32x32)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile each method (warm-up pays compilation)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels-last memory format (default: as train.channels_last defaults)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per method (the median is reported)")
    p.add_argument("--fold-teacher-bn", action="store_true",
                   help="methods train with the teacher's BNs folded (train.fold_teacher_bn); the bound stays unfolded")
    p.add_argument("--teacher-views", type=int, metavar="K",
                   help="methods train on K fixed views per image from a teacher cache built before the timing "
                        "(train.teacher_views); the bound stays a teacher forward per step")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. dfa.mode=last (repeatable)")
    p.add_argument("--output", type=Path, help="JSON file (default results/throughput/<pair>_<shape>_..json, "
                   "or _2, _3... after it: an existing results file is never overwritten by default)")
    p.add_argument("--force", action="store_true", help="overwrite the existing file named by --output")
    _debug_flag(p)
    p.set_defaults(func=_bench_throughput)

    p = sub.add_parser("report", help="table and curves (PNG) of run directories, finished or not")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--output", type=Path, default=Path("report.png"), help="curves PNG (default report.png)")
    p.add_argument("--group-seeds", action="store_true",
                   help="one line per run name without its _s<seed> suffix (mean and +- 1 std band)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file distillab did not write")
    _debug_flag(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("configs", help="list the shipped configs, or copy some out to edit them")
    p.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    p.add_argument("name", nargs="?", help="copy: a config file or folder, e.g. cifar100/kd or fashion_mnist")
    p.add_argument("dest", nargs="?", type=Path, help="copy: where to (default ./configs/NAME)")
    _debug_flag(p)
    p.set_defaults(func=_configs)

    p = sub.add_parser("teachers", help="published teachers by name (mdistiller's and RepDistiller's CIFAR-100 "
                       "teachers, the shipped Fashion-MNIST ones); `teachers fetch NAME` downloads and converts one")
    p.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    p.add_argument("name", nargs="?", help="fetch: the teacher, e.g. cifar100_resnet32x4 (see `distillab teachers`)")
    p.add_argument("--from", dest="source", type=Path, metavar="FILE",
                   help="fetch: convert FILE (the release's checkpoint or tar, downloaded by hand) instead of "
                   "downloading")
    p.add_argument("--sha256", metavar="HEX", help="fetch: check the checkpoint against this SHA-256 (instead of "
                   "the recorded one)")
    p.add_argument("--force", action="store_true", help="fetch: download and convert again")
    _debug_flag(p)
    p.set_defaults(func=_teachers)

    p = sub.add_parser("models", help="list the model zoo with parameter counts")
    p.add_argument("--num-classes", type=int, default=100)
    _debug_flag(p)
    p.set_defaults(func=_models)

    p = sub.add_parser("methods", help="list the registered methods and their options")
    _debug_flag(p)
    p.set_defaults(func=_methods)
    return parser


def _allow_code_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-code", action="store_true",
                   help="let the run directory's config import and run code (module: models); without it such a "
                   "config is refused, as a run directory may come from someone else")


def _debug_flag(p: argparse.ArgumentParser) -> None:
    """`--debug` accepted after the subcommand too (SUPPRESS keeps it from resetting the global flag)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _train(args: argparse.Namespace) -> int:
    from distillab.config_files import load_config
    from distillab.run import load_run_config, train_run

    if args.resume is not None:
        if args.config is not None:
            raise DistillabError("with --resume the run's own config.yaml is used: drop the config argument "
                                 "(use --set to change a field, e.g. train.epochs)")
        if args.budget is not None:
            raise DistillabError("with --resume the run's own config.yaml is used: drop --budget")
        cfg = load_run_config(args.resume, args.overrides, allow_code=args.allow_code)
    elif args.config is None:
        raise DistillabError("train needs a config file (or --resume RUN_DIR)")
    else:
        cfg = load_config(args.config, args.overrides, layers=[args.budget] if args.budget else [])
    summary = train_run(cfg, resume=args.resume is not None, force=args.force)
    from distillab.engine.distributed import world_from_env

    if world_from_env().is_main:  # under torchrun, once
        make_console().print(f"[bold green]done[/]: test {summary['test_acc']:.2f}% -> {cfg.run_dir}")
    return 0


def _search(args: argparse.Namespace) -> int:
    raise DistillabError("`distillab search` is gone: a search is now the first stage of its method's run. Run "
                         "`distillab train CONFIG` (method dfa, mode searched, no method.options.weights): it searches "
                         "into RUN/stages/search (aggregation.json, aggregation.png), then distils, resumably")


def _convert(args: argparse.Namespace) -> int:
    from distillab import models
    from distillab.engine.checkpoint import describe_write_failure, load_weights, save_safetensors
    from distillab.run import check_new_file

    check_new_file(args.output, args.force, "output")
    model = models.build(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    load_weights(model, args.input, args.model)  # any known layout, checked key by key
    try:
        save_safetensors(model, args.output, metadata={"model": args.model, "converted_from": str(args.input)},
                         replace=args.force)
    except FileExistsError:
        raise DistillabError(f"{args.output} was written by another process meanwhile: pass --force to overwrite "
                             "it") from None
    except OSError as exc:
        raise DistillabError(f"{describe_write_failure(exc)} while writing {args.output}") from None
    make_console().print(f"[bold green]done[/]: {args.model} ({sum(p.numel() for p in model.parameters()):,} "
                    f"parameters) -> {args.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from distillab.engine.device import resolve_device
    from distillab.engine.evaluate import eval_loader, evaluate
    from distillab.run import restore_method

    cfg, data, method, state = restore_method(args.run_dir, args.overrides, allow_code=args.allow_code)
    network = method.deploy()  # what the run ships, as export writes it
    method.close()
    device = resolve_device(cfg.train.device)
    network.to(device)
    at = f"epoch {state['epoch']}" + (f", step {state['step']}" if state.get("step") else "")
    table = Table(title=f"{args.run_dir}: {cfg.student.name}, deployed from the checkpoint at {at}")
    for col in ("split", "images", "top-1 %", "loss"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, dataset in (("val", data.val), ("test", data.test)):
        if dataset is not None:
            r = evaluate(network, eval_loader(dataset, device, cfg.train.eval_batch_size))
            table.add_row(split, f"{len(dataset):,}", f"{r['acc']:.2f}", f"{r['loss']:.4f}")
    make_console().print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    from distillab.export import export_run

    done = export_run(args.run_dir, args.output, args.overrides, args.format, force=args.force,
                      allow_code=args.allow_code)
    at = f"epoch {done.epoch}" + (f", step {done.step}" if done.step else "")
    make_console().print(f"[bold green]wrote[/] {done.path} ({done.format}): {done.model} ({done.parameters:,} "
                    f"parameters), deployed by {done.method} from the checkpoint at {at}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from distillab.demo import run_demo

    if args.seeds < 1:
        raise DistillabError(f"--seeds must be at least 1, got {args.seeds}")
    run_demo(args.output_dir, seeds=args.seeds, force=args.force)
    return 0


def _bench_suite(args: argparse.Namespace) -> int:
    from distillab.bench.suite import load_suite, run_suite

    if args.seeds < 1:
        raise DistillabError(f"--seeds must be at least 1, got {args.seeds}")
    run_suite(load_suite(args.suite), args.seeds, only=_labels(args.only), train=args.train)
    return 0


def _bench_tune(args: argparse.Namespace) -> int:
    from distillab.bench.suite import load_suite, tune_suite

    suite = load_suite(args.suite)
    if suite.tune is None or not suite.tune.grids:
        raise DistillabError(f"{args.suite}: the suite has no tune: grids")
    chosen = tune_suite(suite, _labels(args.only))
    for label in suite.tune.grids:
        if args.only is None or label in _labels(args.only):
            make_console().print(f"{label}: {', '.join(chosen[label]) if label in chosen else 'not complete'}")
    make_console().print(f"[bold green]done[/]: {suite.results_dir / (suite.name + '_tuning.md')}")
    return 0


def unused_path(path: Path) -> Path:
    """`path`, or the first of <stem>_2, <stem>_3, ... beside it that does not exist yet."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate


def _labels(text: str | None) -> list[str] | None:
    return None if text is None else [label for label in text.split(",") if label]


def _bench_throughput(args: argparse.Namespace) -> int:
    import json

    from distillab import methods
    from distillab.bench.throughput import ThroughputSpec, default_output, measure, parse_shape, results_table
    from distillab.config_files import safe_yaml

    for name, value in (("--batch", args.batch), ("--steps", args.steps), ("--repeats", args.repeats),
                        ("--teacher-views", args.teacher_views or 1)):
        if value < 1:
            raise DistillabError(f"{name} must be at least 1, got {value}")
    names = list(methods.available()) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    options: dict[str, dict] = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not (sep and dot and option):
            raise DistillabError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. kd.temperature=2")
        options.setdefault(method, {})[option] = safe_yaml(value, f"--option {item!r}: ")
    spec = ThroughputSpec(teacher=args.teacher, student=args.student, methods=names,
                          input_shape=parse_shape(args.input), num_classes=args.num_classes, batch=args.batch,
                          device=args.device, amp=args.amp, compile=args.compile,
                          warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                          fold_teacher_bn=args.fold_teacher_bn, teacher_views=args.teacher_views, options=options)
    if args.channels_last is not None:
        spec.channels_last = args.channels_last
    if args.output is not None:
        from distillab.run import check_new_file

        check_new_file(args.output, args.force)
    console = make_console()
    result = measure(spec, console)
    output = args.output or unused_path(default_output(spec))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(results_table(result))
    console.print(f"written {output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from distillab.bench.report import report

    table, figure = report(args.run_dirs, args.output, group_seeds=args.group_seeds, force=args.force)
    console = make_console()
    console.print(table)
    console.print(f"curves: {figure}" if figure else "no finished epoch yet: no curves drawn")
    return 0


def _configs(args: argparse.Namespace) -> int:

    from distillab.config_files import PACKAGED_CONFIGS

    if args.action == "list":
        for path in sorted(PACKAGED_CONFIGS.rglob("*.yaml")):
            print(f"configs/{path.relative_to(PACKAGED_CONFIGS).as_posix()}")
        return 0
    if not args.name:
        raise DistillabError("distillab configs copy NAME [DEST]: name a config file or folder (see `distillab "
                             "configs`)")
    name = args.name.removeprefix("configs/")
    source = PACKAGED_CONFIGS / name
    if not source.resolve().is_relative_to(PACKAGED_CONFIGS.resolve()):
        raise DistillabError(f"{args.name!r} is not a shipped config (see `distillab configs`): name one relative to "
                             "configs/, e.g. cifar100/kd")
    if not source.exists() and (PACKAGED_CONFIGS / f"{name}.yaml").is_file():
        source = PACKAGED_CONFIGS / f"{name}.yaml"
    if not source.exists():
        raise DistillabError(f"no shipped config {args.name!r} (see `distillab configs`)")
    dest = args.dest or Path("configs") / source.relative_to(PACKAGED_CONFIGS)
    if dest.exists():
        raise DistillabError(f"{dest} exists: choose another DEST")
    root = Path("configs") if args.dest is None else dest if source.is_dir() else dest.parent
    files = [(source, dest)] if source.is_file() else [
        (path, dest / path.relative_to(source)) for path in sorted(source.rglob("*.yaml"))]
    copied = copy_configs(files, root)
    print(f"copied {source.relative_to(PACKAGED_CONFIGS)} to {dest}"
          + (f" (with {', '.join(map(str, copied))})" if copied else ""))
    return 0


def copy_configs(files: list[tuple[Path, Path]], root: Path) -> list[Path]:
    """Copy config files and every `base:` file they name, so that the copies resolve on their own. A base goes
    where its relative path puts it if that is inside `root`, else into `root` (its `base:` line rewritten).
    Nothing is replaced: a file already there must be the same. Returns the bases copied besides `files`."""
    import os
    import re

    import yaml

    placed = {src.resolve(): dst for src, dst in files}
    queue, extra = list(files), []
    while queue:
        src, dst = queue.pop(0)
        text = src.read_text()
        base = (yaml.safe_load(text) or {}).get("base")
        if base:
            base_src = (src.parent / str(base)).resolve()
            if base_src not in placed:
                near = Path(os.path.normpath(dst.parent / str(base)))
                inside = near.resolve().is_relative_to(root.resolve())
                placed[base_src] = near if inside else root / base_src.name
                queue.append((base_src, placed[base_src]))
                extra.append(placed[base_src])
            relative = Path(os.path.relpath(placed[base_src], dst.parent)).as_posix()
            if relative != str(base):
                text = re.sub(r"^base:.*$", f"base: {relative}", text, count=1, flags=re.M)
        if dst.exists():
            if dst.read_text() != text:
                raise DistillabError(f"{dst} exists and differs from the config to copy there: choose another DEST")
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)
    return extra


def _teachers(args: argparse.Namespace) -> int:
    from distillab import published

    console = make_console()
    if args.action == "list":
        if args.name or args.source or args.sha256 or args.force:
            raise DistillabError("`distillab teachers` lists; to fetch one: distillab teachers fetch NAME")
        table = Table(title="published teachers (a config names one as teacher.checkpoint: published:NAME)")
        for col in ("name", "model", "data", "from", "SHA-256", "here"):
            table.add_column(col)
        for t in published.TEACHERS.values():
            where = str(t.path()) if t.available() else f"distillab teachers fetch {t.name}"
            table.add_row(t.name, t.model, t.dataset, t.source + (" (shipped)" if t.shipped else ""),
                          "recorded" if t.sha256 else "unknown", where)
        console.print(table)
        console.print(f"fetched teachers go to {published.cache_dir()} ($DISTILLAB_HOME/teachers when set)")
        return 0
    if not args.name:
        raise DistillabError("distillab teachers fetch NAME: name a teacher (see `distillab teachers`)")
    from distillab.teacher_fetch import fetch

    done = fetch(args.name, args.source, args.sha256, args.force, console)
    entry = done.entry
    if done.action == "shipped":
        console.print(f"{entry.name} ships with distillab: nothing to fetch")
    elif done.action == "cached":
        console.print(f"{entry.name} was fetched before (--force to fetch it again)")
    elif done.verified:
        console.print(f"SHA-256 {done.sha256}: checked")
    else:
        console.print(f"SHA-256 {done.sha256}: not verified (no public source gives this file's checksum; pass "
                      "--sha256 to check it against one you trust)")
    kwargs = ""
    if entry.kwargs:
        import yaml

        flow = yaml.safe_dump(entry.kwargs, default_flow_style=True, sort_keys=False, width=1_000).strip()
        kwargs = f", kwargs: {flow}"
    console.print(f"[bold green]{entry.name}[/] ({entry.model}, {entry.dataset}, {entry.source}): {done.path}\n"
                  f"use it: teacher: {{name: {entry.model}{kwargs}, checkpoint: {published.PREFIX}{entry.name}}}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from distillab import models

    table = Table(title=f"distillab model zoo (parameters at {args.num_classes} classes)")
    table.add_column("model")
    table.add_column("parameters", justify="right")
    table.add_column("stage channels", justify="left")
    for name in models.available():
        model = models.build(name, num_classes=args.num_classes)
        table.add_row(name, f"{sum(p.numel() for p in model.parameters()):,}",
                      ", ".join(map(str, model.stage_channels)))
    make_console().print(table)
    return 0


def _methods(args: argparse.Namespace) -> int:
    from distillab import methods

    table = Table(title="distillab methods")
    table.add_column("method")
    table.add_column("teacher")
    table.add_column("what it is")
    table.add_column("options (defaults)")
    for name, cls in methods.available().items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        options = ", ".join(f"{k}={f.default}" for k, f in cls.Options.model_fields.items())
        table.add_row(name, "yes" if cls.requires_teacher else "no", doc[0] if doc else "", options)
    make_console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
