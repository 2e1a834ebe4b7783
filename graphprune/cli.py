"""Command line: `graphprune prune`, `inspect`, `demo`, and `serve` / `submit` for the HTTP service.

Exit codes (a contract other tools rely on), one per cause whichever the command:
  0 success · 1 unexpected internal error · 2 usage error (bad option, missing or unreadable input file,
  missing output folder, an output that would overwrite the input) · 3 invalid or unsafe model ·
  4 target impossible · 5 the pruned model failed validation (nothing was written) ·
  6 the server cannot be reached (`submit`) · 7 `submit --timeout` ran out (the job goes on)
`submit` returns the same codes for the remote job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from graphprune import __version__, mlflow_io
from graphprune.api import analyze, prune
from graphprune.client import DEFAULT_URL
from graphprune.config import COMPENSATIONS, HESSIAN_SOURCES, RECOVER_STEPS, RECOVERIES, STREAMS, TARGETS, PruneConfig
from graphprune.errors import GraphpruneError, UsageError
from graphprune.importance import CRITERIA

EPILOG = """exit codes: 0 ok, 1 internal error, 2 usage, 3 invalid model, 4 target impossible,
5 validation failed, 6 server unreachable, 7 --timeout ran out"""
Progress = Callable[[str, float], None]


class _Parser(argparse.ArgumentParser):
    """Usage errors in two lines, not the whole usage block that buries the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\ntry '{self.prog} --help'\n")


def _shape_arg(text: str) -> tuple[str, list[int]]:
    name, _, dims = text.partition("=")
    try:
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... (e.g. input=1,3,224,224), got {text!r}") from None


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size_arg(text: str) -> int:
    """Bytes from 4G, 512M, 1.5G (binary units) or a plain number."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or 1000000, got {text!r}") from None


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)  # its range is PruneConfig's to check (a usage error, exit 2)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphprune", description="Structured pruning of ONNX models, data-free.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"graphprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("prune", help="prune a model", epilog=EPILOG)
    pr.add_argument("input", type=Path, help="an .onnx file, or an MLflow model URI (models:/NAME/VERSION, "
                                             "models:/NAME@ALIAS, runs:/RUN_ID/PATH)")
    pr.add_argument("output", type=Path)
    _add_prune_options(pr)
    _add_mlflow_options(pr, local=True)

    ins = sub.add_parser("inspect", help="show groups, why some cannot be pruned, params and FLOPs")
    ins.add_argument("input", type=Path)
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--members", action="store_true", help="list every group's parameter members")
    ins.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=D1,D2,...")

    demo = sub.add_parser("demo", help="prune a bundled demo model and show the report")
    demo.add_argument("--out", type=Path, default=Path("graphprune-demo"))
    demo.add_argument("--sparsity", type=float, default=PruneConfig().sparsity)

    srv = sub.add_parser("serve", help="run the HTTP jobs service (settings: GRAPHPRUNE_* variables, see README)")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--data-dir", type=Path,
                     help="jobs database and files (default $GRAPHPRUNE_DATA_DIR, else ~/.local/share/graphprune)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    sb = sub.add_parser("submit", help="prune on a graphprune server, with a progress bar", epilog=EPILOG)
    sb.add_argument("input", type=Path, help="an .onnx file, or an MLflow model URI the server downloads")
    sb.add_argument("output", type=Path)
    sb.add_argument("--server", help=f"server URL (default $GRAPHPRUNE_URL, else {DEFAULT_URL})")
    sb.add_argument("--token", help="bearer token (default $GRAPHPRUNE_API_TOKEN)")
    sb.add_argument("--timeout", type=float, help="stop waiting after this many seconds (the job goes on)")
    _add_prune_options(sb)
    _add_mlflow_options(sb, local=False)
    return p


def _add_mlflow_options(p: argparse.ArgumentParser, local: bool) -> None:
    """MLflow options (graphprune[mlflow]); with `submit` the server's own MLflow store is used."""
    p.add_argument("--register-as", metavar="NAME",
                   help="register the pruned model in MLflow as a new version of NAME (report: 'mlflow' entry)")
    if local:
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")


def _add_prune_options(pr: argparse.ArgumentParser) -> None:
    """The pruning options `prune` and `submit` share, with PruneConfig's defaults (the server's too)."""
    defaults = PruneConfig()
    pr.add_argument("--sparsity", type=float, default=defaults.sparsity,
                    help=f"fraction of the target to remove, [0, 1) (default {defaults.sparsity:g})")
    pr.add_argument("--target", choices=TARGETS, default="channels")
    pr.add_argument("--criterion", choices=["auto", *sorted(CRITERIA)], default="auto",
                    help="unit importance: weight magnitude (l1, l2, lamp, bn), random, or obs (the OBS error of "
                         "removing each unit, on the same layer statistics compensation uses); auto (default): "
                         "obs with --compensate obs, l2 with --compensate none")
    scope = pr.add_mutually_exclusive_group()
    scope.add_argument("--global", dest="global_ranking", action="store_true", help="rank units across groups")
    scope.add_argument("--local", dest="global_ranking", action="store_false", help="same ratio per group (default)")
    pr.add_argument("--round-to", type=_round_to, default=None, metavar="N|auto",
                    help="keep a multiple of N units per group; auto: the multiple each group's layers run "
                         "fastest at on this machine, measured once (a few seconds) and cached "
                         "(default: auto toward flops, params or latency; 1 toward channels)")
    pr.add_argument("--max-group-sparsity", type=float, default=0.9, help="cap on the fraction removed per group")
    pr.add_argument("--min-channels", type=int, default=1, help="units every group keeps at least")
    pr.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                    help="node or initializer names (glob patterns) whose groups stay untouched")
    pr.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=D1,D2,...",
                    help="concrete shape for a dynamic input (repeatable)")
    pr.add_argument("--report", type=Path, help="write the JSON report here")
    pr.add_argument("--report-html", type=Path, metavar="FILE",
                    help="write the report as one self-contained HTML page with plots")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--no-validate", dest="validate", action="store_false",
                    help="skip onnxruntime validation (not recommended)")
    pr.add_argument("--latency-runs", type=int, default=5)
    pr.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                    help="keep BatchNormalization nodes instead of folding them into the Conv/ConvTranspose/Gemm "
                         "before them (the same outputs, fewer nodes and bytes)")
    pr.add_argument("--fuse-activations", action="store_true",
                    help="rewrite decomposed HardSwish (x * clip(x + 3, 0, 6) / 6, as paddle2onnx writes it) as "
                         "one op: 4 elementwise passes become 1-2 (PP-OCR cls 1.38x, PicoDet 1.49x faster); "
                         "outputs differ by float rounding, which the validation reports")
    pr.add_argument("--compensate", choices=COMPENSATIONS, default="obs",
                    help="correct the consumers of removed channels (data-free OBS, default) or not")
    pr.add_argument("--streams", choices=STREAMS, default="keep",
                    help="rotate: residual streams read through RMSNorm or pre-norm LayerNorm (Llama-, GPT-2-style "
                         "decoders; LayerNorm streams are centred first) are turned to their "
                         "principal directions, which leaves the model's function unchanged, and the weakest "
                         "--sparsity of their width is removed from every writer and reader (exact but for the "
                         "removed directions' energy, reported); keep (default): their width stays")
    pr.add_argument("--allow-approximate-norms", dest="approximate_norms", action="store_true",
                    help="let channels go through cross-channel normalizations (LayerNorm, RMSNorm's ReduceMean): "
                         "their statistics then come from the kept channels, an approximation "
                         "reported per group and measured in validation (ViT, GPT-2, ConvNeXt-style residual widths)")
    pr.add_argument("--calibration", metavar="FILE.npz",
                    help="real inputs (one array per model input) for the OBS statistics instead of synthetic ones")
    pr.add_argument("--samples", type=int, default=128, help="inputs used to estimate the OBS statistics")
    pr.add_argument("--hessian-source", choices=HESSIAN_SOURCES, default="auto",
                    help="where OBS statistics come from (auto: calibration if given, else synthetic)")
    pr.add_argument("--damping", type=float, default=0.01, help="OBS damping, fraction of the mean diagonal")
    pr.add_argument("--kron-columns", type=int, default=1024, metavar="N",
                    help="Convs with more im2col columns (input channels x kernel area) than N keep their OBS "
                         "statistics Kronecker-factored, channels x kernel taps (much faster and smaller on wide "
                         "layers, slightly less exact); 0: every Conv wider than 1x1")
    pr.add_argument("--obs-memory", type=_size_arg, default=0, metavar="SIZE",
                    help="memory the OBS statistics may hold at once, e.g. 4G (default: 40%% of what is available); "
                         "a smaller budget takes more passes over the model, to the same result")
    rec = pr.add_argument_group("recovery (pip install 'graphprune[recover]')")
    rec.add_argument("--recover", choices=RECOVERIES, default="none",
                     help="distill: after one-shot pruning, train the pruned model to match the dense one's outputs, "
                          "on --calibration inputs (no labels needed) or, without them, on synthetic inputs; kept "
                          "only if it agrees better with the dense model on held-out inputs (default: none)")
    rec.add_argument("--recover-steps", type=int, default=None, metavar="N",
                     help=f"optimizer steps (default {RECOVER_STEPS['calibration']} with --calibration, "
                          f"{RECOVER_STEPS['synthetic']} on synthetic inputs)")
    rec.add_argument("--recover-lr", type=float, default=defaults.recover_lr, metavar="F",
                     help=f"Adam step size, cosine-decayed (default {defaults.recover_lr:g})")
    rec.add_argument("--recover-batch", type=int, default=defaults.recover_batch, metavar="N")
    rec.add_argument("--recover-time", type=float, default=defaults.recover_time, metavar="S",
                     help="stop training after S seconds (default 0: no limit)")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sparsity": args.sparsity, "target": args.target, "criterion": args.criterion,
        "global_ranking": args.global_ranking, "round_to": args.round_to,
        "max_group_sparsity": args.max_group_sparsity, "min_channels": args.min_channels,
        "exclude": list(args.exclude), "seed": args.seed, "validate": args.validate,
        "latency_runs": args.latency_runs, "fold_bn": args.fold_bn,
        "fuse_activations": args.fuse_activations, "input_shapes": dict(args.input_shape),
        "compensate": args.compensate, "streams": args.streams, "approximate_norms": args.approximate_norms,
        "samples": args.samples,
        "hessian_source": args.hessian_source, "damping": args.damping, "kron_columns": args.kron_columns,
        "obs_memory": args.obs_memory, "recover": args.recover,
        "recover_steps": args.recover_steps, "recover_lr": args.recover_lr, "recover_batch": args.recover_batch,
        "recover_time": args.recover_time,
        **({"calibration": args.calibration} if args.calibration else {}),
    }


@contextmanager
def _progress(quiet: bool) -> Iterator[Progress]:
    """A tqdm bar on a terminal; plain lines when stderr is a log, which its carriage-return frames garble."""
    if quiet:
        yield lambda stage, frac: None
    elif sys.stderr.isatty():
        with tqdm(total=100, desc="pruning", unit="%", leave=False, bar_format="{desc:<18}{bar}| {n:.0f}%") as bar:
            def advance(stage: str, frac: float) -> None:
                bar.set_description_str(stage)
                bar.update(frac * 100 - bar.n)

            yield advance
    else:
        yield _LogProgress()


class _LogProgress:
    """One line per stage change and at most one per 10% within a stage: short enough for CI logs."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.decile = -1

    def __call__(self, stage: str, frac: float) -> None:
        decile = int(frac * 10)
        if stage != self.stage or decile > self.decile:
            self.stage, self.decile = stage, decile
            print(f"graphprune: {stage} {frac:.0%}", file=sys.stderr, flush=True)


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse before the (possibly long) prune what would fail or destroy after it: a missing input or
    output folder, or an output or report that is the input (or another output) under another name."""
    local = not mlflow_io.is_model_uri(str(args.input))
    written: list[tuple[str, Path]] = [("input", args.input)] if local else []
    if local:
        _require_file(args.input)
    for role, path in (("output", args.output), ("--report", args.report), ("--report-html", args.report_html)):
        if path is None:
            continue
        folder = path.parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist; create it first"
            raise UsageError(f"folder {folder} of the {role} {path} {what}")
        if path.is_dir():
            raise UsageError(f"the {role} {path} is a folder; name a file in it")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write the {role} {path}: folder {folder} is not writable")
        for other_role, other in written:
            if _same_file(path, other):
                fix = f"e.g. {other.with_name(f'{other.stem}.pruned{other.suffix}')}" if role == "output" else ""
                raise UsageError(f"the {role} {path} is the {other_role} {other}: writing it would overwrite "
                                 f"the {other_role}; give the {role} another name {fix}".rstrip())
        written.append((role, path))


def _same_file(a: Path, b: Path) -> bool:
    """Also through symlinks and hard links, which comparing names misses."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _require_file(path: Path) -> None:
    """A missing or unreadable input is a usage error (2) for every command, not an invalid model (3)."""
    if not path.is_file():
        raise UsageError(f"input model not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read the input model {path}: permission denied")


def _prune(args: argparse.Namespace) -> int:
    _check_paths(args)
    cfg = PruneConfig.from_dict(_options(args))
    with _local_input(args, cfg.max_model_bytes) as source, _progress(args.quiet) as progress:
        result = prune(source, cfg, progress=progress)
    if args.register_as:
        origin = str(args.input) if mlflow_io.is_model_uri(str(args.input)) else str(args.input.absolute())
        mlflow_io.register_result(result, name=args.register_as, source=origin, tracking_uri=args.tracking_uri)
    if args.report:  # first: what was pruned is known even if the model cannot be written
        args.report.write_text(result.report.to_json())
    if args.report_html:
        args.report_html.write_text(result.report.to_html(f"graphprune: {args.input.name}"))
    try:
        result.save(args.output)
    except OSError as exc:
        kept = f"; the report is in {args.report}" if args.report else ""
        print(f"graphprune: error: cannot write {args.output}: {exc}{kept}", file=sys.stderr)
        return 1
    _done(args, result.report.summary())
    return 0


@contextmanager
def _local_input(args: argparse.Namespace, max_bytes: int) -> Iterator[Path]:
    """The input as a local file: an MLflow model URI is downloaded to a temporary folder first."""
    if mlflow_io.is_model_uri(str(args.input)):
        with mlflow_io.fetched(str(args.input), max_bytes=max_bytes, tracking_uri=args.tracking_uri) as path:
            yield path
        return
    yield args.input


def _submit(args: argparse.Namespace) -> int:
    from graphprune.client import Client
    from graphprune.report import Report, html

    _check_paths(args)
    remote = mlflow_io.is_model_uri(str(args.input))
    extra = {"register_as": args.register_as} if args.register_as else {}
    with Client(args.server, token=args.token) as client, _progress(args.quiet) as progress:
        report = client.prune(str(args.input) if remote else args.input, args.output, {**_options(args), **extra},
                              timeout=args.timeout, progress=progress)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    if args.report_html:
        args.report_html.write_text(html.render(report, f"graphprune: {args.input.name}"))
    kind = mlflow_io.RegisteredReport if "mlflow" in report else Report
    known = kind.__dataclass_fields__  # a server of another version may report more
    _done(args, kind(**{k: v for k, v in report.items() if k in known}).summary())
    return 0


def _done(args: argparse.Namespace, summary: str) -> None:
    if not args.quiet:
        print(f"target  {args.target}, sparsity {args.sparsity:g}")
        print(summary)
        print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))


def _serve(args: argparse.Namespace) -> int:
    from service.app import serve
    from service.settings import Settings

    serve(Settings.from_env(**({"data_dir": args.data_dir} if args.data_dir else {})), args.host, args.port,
          args.log_level)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    _require_file(args.input)
    an = analyze(args.input, input_shapes=dict(args.input_shape))
    summary = an.summary(members=args.members)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"params {summary['params']:,}   MACs {summary['flops']:,}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    g = summary["groups"]
    print(f"groups {g['total']} total, {g['prunable']} prunable ({g['prunable_channels']:,} channels)")
    for reason, count in g["blocked_reasons"].items():
        print(f"  blocked: {count} group(s) {reason}")
    print(f"\n{'id':>4} {'units':>6} {'prunable':>8}  producers / why not")
    for grp in g["list"]:
        _print_group(grp)
    return 0


def _print_group(grp: dict[str, Any]) -> None:
    why = "; ".join(f"{r['kind']} at {r['op']} '{r['node']}'" for r in grp["reasons"][:2])
    producers = ", ".join(grp["producers"][:3]) + (" ..." if len(grp["producers"]) > 3 else "")
    print(f"{grp['id']:>4} {grp['units']:>6} {'yes' if grp['prunable'] else 'no':>8}  {producers}"
          + (f"  [{why}]" if why and not grp["prunable"] else ""))
    for m in grp.get("members", []):
        print(f"{'':>22}{m['role']:<7} {m['tensor']} axis {m['axis']} ({m['positions']} positions)")


def _demo(args: argparse.Namespace) -> int:
    from graphprune.demo import demo_model
    from graphprune.model import save_model

    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / "demo.onnx"
    save_model(demo_model(), src)
    print(f"bundled demo model written to {src}; pruning {args.sparsity:.0%} of its channels")
    ns = _parser().parse_args(["prune", str(src), str(args.out / "demo.pruned.onnx"),
                               "--sparsity", str(args.sparsity), "--report", str(args.out / "report.json")])
    return _prune(ns)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handlers = {"prune": _prune, "inspect": _inspect, "demo": _demo, "serve": _serve, "submit": _submit}
    try:
        return handlers[args.command](args)
    except GraphpruneError as exc:
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
