"""The command line: a thin layer over the Python API.

Exit codes: 0 success; 1 a budget exceeded / verification above tolerance; 2 usage, config or
model error; 3 an internal error (a bug: please report it with ``--debug`` output).
"""

from __future__ import annotations

import functools
import os
import sys

import click

from . import __version__
from .errors import EXIT_ERROR, SepifyError

EXIT_INTERNAL = 3


class _State:
    debug = False


def _handle_errors(fn):
    """Turn errors into one line on stderr and a documented exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, not at exit ("Exception ignored ...")
        except BrokenPipeError:
            _quiet_broken_pipe()
        except SepifyError as e:
            if _State.debug:
                raise
            click.echo(f"sepify: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, _Terminated)
            click.echo(f"sepify: {'terminated' if terminated else 'interrupted'}; outputs were left as they were", err=True)
            sys.exit(143 if terminated else 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except MemoryError:
            click.echo("sepify: error: out of memory", err=True)
            sys.exit(EXIT_ERROR)
        except Exception as e:  # noqa: BLE001 - last resort: never a traceback without --debug
            if _State.debug:
                raise
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            click.echo(f"sepify: internal error: {type(e).__name__}: {msg} (rerun with --debug for a traceback)", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


#: exit code when the reader of stdout went away (``sepify analyze m.onnx | head``): 128 + SIGPIPE,
#: what a shell reports for a command a closed pipe ends
EXIT_BROKEN_PIPE = 141


def _quiet_broken_pipe() -> None:
    """The reader of stdout closed the pipe: stop without a message (the output was not wanted
    any more) and point stdout at /dev/null so that the interpreter's last flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # (not a real file: a test runner's stream)
        pass
    sys.exit(EXIT_BROKEN_PIPE)


def _emit(text: str | None, output: str | None, inputs=None) -> None:
    if text is None:
        return
    if output and output != "-":
        from .fileio import write_text

        write_text(output, text, inputs)
    else:
        click.echo(text, nl=False)


def _render(render, output: str | None, inputs=None) -> None:
    """``render(stream)`` prints a table on ``stream`` (returns None) or returns text. The
    result goes to stdout, or atomically to ``output`` (refused if it is one of ``inputs``)."""
    if output and output != "-":
        import io

        buf = io.StringIO()
        text = render(buf)
        _emit(buf.getvalue() if text is None else text, output, inputs)
    else:
        _emit(render(sys.stdout), None)


#: formats written for another program (a browser, Netron, Model Explorer), not the terminal
VIEWER_FORMATS = ("html", "netron", "model-explorer")
_metric_opt = click.option("--metric", type=click.Choice(["macs", "flops", "params", "output_bytes", "live_bytes"]),
                           default="macs", show_default=True,
                           help="The quantity of a --format model-explorer file (one per file).")


def _viewer_text(data: dict, fmt: str, metric: str = "macs", model=None) -> str:
    """``data`` (an analysis, rewrite or diff report) as an HTML page, a Netron attachment or
    Model Explorer node data. ``model``: the analyzed model, whose graph gives Model Explorer's
    names of nodes that sepify had to name itself."""
    if fmt == "html":
        from .render.html import render_html

        return render_html(data)
    if fmt == "netron":
        from .render.netron import render_netron

        return render_netron(data)
    from .render.model_explorer import render_model_explorer

    graph = None
    if model is not None and any("onnx_name" in layer for layer in data.get("layers") or []):
        from .model.reading import read_model

        graph = read_model(model, load_external_data=False)[0].graph
    return render_model_explorer(data, metric, graph)


def _check_viewer_format(fmt: str | None) -> None:
    """Fail before any work when a format's optional dependency is missing (exit 2)."""
    if fmt == "html":
        from .render.html import check_available

        check_available()


def _guard(inputs, outputs: dict[str, str | None]):
    """Refuse, before any work, an output that is an input of the command or that two output
    options name the same file; returns ``inputs`` for the writers' own check."""
    import os

    from .errors import UsageError

    given = [(opt, path) for opt, path in outputs.items() if path and path != "-"]
    for opt, path in given:
        inputs.refuse(path, opt)
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):  # (the writers check again; this is before minutes of work)
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise UsageError(f"{path}: {opt}: folder {folder} {what}")
        if os.path.isdir(path):
            raise UsageError(f"{path}: {opt}: is a folder, not a file")
    for i, (opt_a, a) in enumerate(given):
        for opt_b, b in given[i + 1:]:
            same = os.path.abspath(a) == os.path.abspath(b)
            if not same and os.path.exists(a) and os.path.exists(b):
                same = os.path.samefile(a, b)
            if same:
                raise UsageError(f"{b}: {opt_a} and {opt_b} name the same file")
    return inputs


def _warn_table_options(fmt: str, given: dict, shaped: str) -> None:
    """Options that shape rows of the human formats are warned about where they do nothing (a
    JSON report, a page or a viewer file holds every layer)."""
    used = [opt for opt, on in given.items() if on]
    if used:
        click.echo(f"sepify: warning: {', '.join(used)} shape{'s' if len(used) == 1 else ''} {shaped}; "
                   f"--format {fmt} holds every row (ignored)", err=True)


def _warn_metric(metric: str, *formats: str) -> None:
    if metric != "macs" and "model-explorer" not in formats:
        click.echo(f"sepify: warning: --metric {metric} is the quantity of a --format model-explorer file; "
                   "other formats show every quantity (ignored)", err=True)


def _warn_unused_dims(model: str, unused) -> None:
    """A --dim the model has no symbol for is ignored (noted in the report) and warned about:
    it matches no model of the command (a typo?)."""
    for name in unused:
        click.echo(f"sepify: warning: --dim {name}: {model} has no dimension named {name!r} (ignored)", err=True)


def _shapes_and_dims(input_shape: tuple[str, ...], dim: tuple[str, ...]):
    from .units import parse_dim, parse_input_shape

    shapes = dict(parse_input_shape(s) for s in input_shape)
    dims = dict(parse_dim(d) for d in dim)
    return shapes, dims


_input_shape_opt = click.option("--input-shape", "input_shape", multiple=True, metavar="NAME=1x3x224x224",
                                help="Override the shape of a graph input (repeatable).")
_dim_opt = click.option("--dim", "dim", multiple=True, metavar="SYMBOL=VALUE",
                        help="Bind a symbolic dimension everywhere, e.g. batch=8 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sepify")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """sepify: static cost analysis, depthwise-separable rewriting and budget checks for ONNX models.

    Exit codes: 0 success, 1 budget exceeded or verification failed, 2 usage/config/model error,
    3 internal error; 130 interrupted (Ctrl-C), 143 terminated, 141 stdout closed (| head).
    """
    _State.debug = debug
    _terminate_like_interrupt(click.get_current_context())


def _terminate_like_interrupt(ctx: click.Context) -> None:
    """SIGTERM (CI cancelling a job) unwinds like Ctrl-C: temporary files are removed by the
    atomic writers' cleanup, the previous output stays as it was, exit code 130 (128 + SIGINT) or
    143 (128 + SIGTERM). The previous handler is restored when the command ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


class _Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown", *VIEWER_FORMATS]),
              default="table", show_default=True,
              help="Output format: html (a self-contained page), netron (a Netron attachment), model-explorer "
                   "(Model Explorer node data, see --metric); see docs/cli.md.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to this file (atomically).")
@_input_shape_opt
@_dim_opt
@_metric_opt
@click.option("--by-op", is_flag=True, help="Group rows by op type.")
@click.option("--top", type=click.IntRange(min=1), help="Only the N heaviest rows (by --sort, default MACs).")
@click.option("--sort", type=click.Choice(["graph", "macs", "flops", "params", "output_bytes", "name"]),
              default="graph", show_default=True, help="Row order.")
@_handle_errors
def analyze(model, fmt, output, input_shape, dim, metric, by_op, top, sort):
    """Per-layer and total MACs, FLOPs, parameters and activation sizes of MODEL."""
    from .cost.analysis import analyze as run
    from .cost.analysis import no_gc
    from .render.analysis import render_analysis

    from .fileio import Inputs

    inputs = _guard(Inputs().add_model(model), {"-o": output})
    _check_viewer_format(fmt)
    shapes, dims = _shapes_and_dims(input_shape, dim)
    if fmt not in ("table", "csv", "markdown"):
        _warn_table_options(fmt, {"--by-op": by_op, "--top": top, "--sort": sort != "graph"}, "the table, CSV and Markdown")
    _warn_metric(metric, fmt)
    with no_gc():  # the report makes a few objects per layer, and no reference cycles
        result = run(model, input_shapes=shapes, dims=dims)
        _warn_unused_dims(model, result.unused_dims)
        data = result.to_dict()
        if fmt in VIEWER_FORMATS:
            _emit(_viewer_text(data, fmt, metric, model), output, inputs)
        else:
            _render(lambda stream: render_analysis(data, fmt, stream, sort, top, by_op), output, inputs)


def _rank_value(ctx, param, value):
    if value is None or value == "full":
        return value
    try:
        v = int(value)
    except ValueError:
        raise click.BadParameter("a positive integer or 'full'") from None
    if v < 1:
        raise click.BadParameter("a positive integer or 'full'")
    return v


def _ranks_list(text: str) -> tuple[int, ...]:
    """``--sensitivity-ranks 1,2,4``: positive integers (one line, exit 2 otherwise)."""
    from .errors import UsageError

    try:
        got = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        got = ()
    if not got or any(r < 1 for r in got):
        raise UsageError(f"--sensitivity-ranks: give positive integers separated by commas, e.g. 1,3 (not {text!r})")
    return got


def _holdout_value(text: str) -> float:
    from .errors import UsageError

    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if v != v or v in (float("inf"), float("-inf")):  # (float() reads "nan", "inf", "1e400")
        raise UsageError(f"--holdout must be a fraction in [0, 1) or a sample count, not {text!r}")
    return int(v) if v >= 1 and v == int(v) else v


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the rewritten model.")
@click.option("--rank", callback=_rank_value, metavar="N|full", help="Rank per layer (default 1: the MobileNet layer).")
@click.option("--energy", type=float, help="Per layer, the smallest rank keeping this fraction of the weight energy.")
@click.option("--max-error", type=float, help="Per layer, the smallest rank with relative weight error <= this "
                                             "(with --calibration: relative OUTPUT error).")
@click.option("--target-macs", metavar="N", help="Global MAC budget for the whole model, e.g. 600M.")
@click.option("--target-ratio", metavar="F", help="Global MAC budget as a fraction of the original, e.g. 0.3 or 30%.")
@click.option("--orientation", type=click.Choice(["dw-first", "pw-first", "auto"]), default="dw-first", show_default=True)
@click.option("--form", type=click.Choice(["fast", "native", "split", "tiled", "auto"]), default=None,
              help="Graph form of rank > 1 pairs: native (one depthwise conv with channel multiplier r), split (r "
                   "multiplier-1 depthwise convs + Concat), tiled (input repeated r times, one multiplier-1 "
                   "depthwise conv), fast (split: the form measured fastest in "
                   "onnxruntime, docs/rewrite.md) or auto (each layer's fastest, measured now); all compute the same "
                   "function. Default: auto with --objective latency, else fast.")
@click.option("--objective", type=click.Choice(["macs", "latency"]), default=None,
              help="macs (default): ranks by the criterion, MACs counted. latency: every candidate is timed in "
                   "onnxruntime at its input shape and a layer is rewritten only where it is measured faster.")
@click.option("--target-speedup", type=float, metavar="X",
              help="Latency budget: the whole model X times faster (measured), with the least error; implies "
                   "--objective latency.")
@click.option("--latency-passes", type=click.IntRange(min=1), default=3, show_default=True, metavar="N",
              help="--target-speedup: at most N allocations, each checked by timing the whole rewritten model; a "
                   "missed target re-allocates with the per-layer savings corrected by the measured ones.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="onnxruntime intra-op threads for the latency measurements (default: onnxruntime's default).")
@click.option("--clock", type=click.Choice(["wall", "process"]), default="wall", show_default=True,
              help="Latency clock: wall (elapsed time) or process (CPU time of the process; with --threads 1 only: "
                   "the latency without the time a busy, shared machine gives to other processes).")
@click.option("--include", multiple=True, metavar="REGEX", help="Only rewrite Convs whose name matches (re.search).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Never rewrite Convs whose name matches.")
@click.option("--allow-increase", is_flag=True, help="Rewrite even where the chosen rank costs more MACs.")
@click.option("--no-fold-bn", is_flag=True, help="Do not fold a following BatchNormalization into the kernel.")
@click.option("--calibration", type=click.Path(), metavar="PATH",
              help="Calibration data (.npz with one [S, *input_shape] array per input, or a folder of .npz "
                   "files, one sample each): fit each layer to its output on this data (docs/rewrite.md).")
@click.option("--holdout", default="0.2", show_default=True, metavar="F|N",
              help="With --calibration: samples held out from the fit (fraction in [0, 1) or a count), "
                   "used to measure the rewrite's errors.")
@click.option("--calib-rows", type=int, default=16384, show_default=True, metavar="N",
              help="With --calibration: patch rows (sampled output positions) accumulated per layer.")
@click.option("--calib-method", type=click.Choice(["als", "refit"]), default="als", show_default=True,
              help="With --calibration: alternating least squares, or only the closed-form refit of the second factor.")
@click.option("--no-sequential", is_flag=True,
              help="With --calibration: fit every layer on the original model's inputs instead of the "
                   "already-rewritten model's (faster, less accurate at high compression).")
@click.option("--sensitivity", type=click.Choice(["measured", "none"]), default="measured", show_default=True,
              help="With --calibration and a budget (--target-macs/--target-ratio/--target-speedup): weigh each "
                   "layer's error by what it measurably does to the model's outputs (measured), or count every "
                   "layer's relative output error alike (none). docs/rewrite.md.")
@click.option("--sensitivity-samples", type=click.IntRange(min=1), default=16, show_default=True, metavar="N",
              help="With --sensitivity measured: held-out samples the sensitivities are measured on.")
@click.option("--sensitivity-ranks", default="1,2,4", show_default=True, metavar="R,R,...",
              help="With --sensitivity measured: the ranks each layer's sensitivity is measured at (interpolated "
                   "between them; more ranks cost one suffix run each per sample).")
@click.option("--distortion", type=click.Choice(["auto", "kl", "rel"]), default="auto", show_default=True,
              help="How --sensitivity measured compares the model's outputs: KL divergence of probabilities or "
                   "logits, relative squared error, or auto (KL for softmax/log-softmax/classifier-logit outputs).")
@click.option("--cache-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="With --calibration: where the per-model error and sensitivity tables are cached "
                   "(default $SEPIFY_CACHE_DIR, else ~/.cache/sepify).")
@click.option("--no-cache", is_flag=True, help="With --calibration: neither read nor write the tables' cache.")
@click.option("--no-refit-kept", is_flag=True,
              help="With --calibration: do not refit the Convs left dense after rewritten layers to their "
                   "original outputs (they are refitted by default; MACs unchanged).")
@click.option("--no-residual-target", is_flag=True,
              help="With --calibration: fit a conv that feeds a residual Add to its own original output, not "
                   "to the original sum minus the drifted other branch (the default, which also undoes the "
                   "skip path's drift).")
@click.option("--calib-cache-mb", type=click.FloatRange(min=0), default=2048, show_default=True, metavar="MB",
              help="With --calibration: memory for activations held between calibration passes (the original "
                   "model's inputs of the layers, the rewritten model's tensors where phase 2 left off); what does "
                   "not fit is recomputed (0: every pass runs its whole prefix). Changes the time, not the result.")
@click.option("--providers", metavar="LIST",
              help="onnxruntime execution providers of the calibration and verification sessions, in order, "
                   "e.g. CUDA,CPU (default CPU). A provider this onnxruntime lacks: exit 2. The latency "
                   "measurements keep their own CPU sessions.")
@click.option("--verify", "do_verify", is_flag=True,
              help="Run both models in onnxruntime on every verification sample and compare outputs.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=True),
              help="Samples for --verify (implies it): .npz (one array per input, samples on a leading axis) or a folder of .npz.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random --verify input (a wiring smoke test, used without data), and of the --calibration holdout split and sampled positions.")
@click.option("--tolerance", type=float,
              help="Exit 1 when the checked error (max relative L2 over outputs and pre-saturation tensors) exceeds this (implies --verify).")
@click.option("--verify-layers", is_flag=True, help="Also report the error after each rewritten layer (implies --verify).")
@click.option("--dry-run", is_flag=True, help="Plan and report only; write no model.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown", *VIEWER_FORMATS]), default="table",
              show_default=True, help="Report format (html, netron and model-explorer describe the rewritten model).")
@click.option("--report", "report_file", type=click.Path(dir_okay=False),
              help="Also write the report to this file: in --format, or HTML when FILE ends in .html (JSON / "
                   "Markdown for .json / .md under the default --format table). With an html, netron or "
                   "model-explorer --format, stdout then shows the table.")
@_metric_opt
@_input_shape_opt
@_dim_opt
@_handle_errors
def rewrite(model, output, rank, energy, max_error, target_macs, target_ratio, orientation, form, include, exclude,
            allow_increase, no_fold_bn, calibration, holdout, calib_rows, calib_method, no_sequential, sensitivity,
            sensitivity_samples, sensitivity_ranks, distortion, cache_dir, no_cache, no_refit_kept, no_residual_target, calib_cache_mb, providers, do_verify,
            inputs_file, seed, tolerance, verify_layers, dry_run, fmt, report_file, metric, input_shape, dim,
            **latency):  # --objective, --target-speedup, --threads (sepify.rewrite.measure)
    """Replace standard Convs of MODEL by depthwise + pointwise pairs (low-rank SVD)."""
    from .errors import EXIT_FAILED, UsageError
    from .rewrite.pipeline import RewriteOptions, rewrite as run
    from .units import parse_fraction, parse_quantity

    if not output and not dry_run:
        raise UsageError("give -o OUTPUT (or --dry-run to only report)")
    if output == "-" and not dry_run:
        raise UsageError("-o -: the rewritten model is written to a file, not to stdout (stdout carries the report)")
    if report_file == "-":  # stdout: where the report goes anyway (once)
        report_file = None
    if tolerance is not None and not (tolerance >= 0 and tolerance != float("inf")):  # (nan fails both)
        raise UsageError(f"--tolerance must be a finite number >= 0, not {tolerance:g}")
    from .fileio import Inputs

    # before the work, not only at save time
    guard = Inputs().add_model(model).add(inputs_file, "the --inputs file").add(calibration, "the --calibration data")
    for folder, role in ((calibration, "a --calibration sample file"), (inputs_file, "an --inputs sample file")):
        if folder and os.path.isdir(folder):
            for f in sorted(os.listdir(folder)):
                guard.add(os.path.join(folder, f), role)
    inputs = _guard(guard,
                    {"-o": None if dry_run else output, "--report": report_file})
    if report_file and output and not dry_run:  # the model's data file is an output too (external data)
        for data in (output + ".data", output + ".alt.data"):
            if os.path.abspath(report_file) == os.path.abspath(data) or (
                    os.path.exists(report_file) and os.path.exists(data) and os.path.samefile(report_file, data)):
                raise UsageError(f"{report_file}: --report is a name of -o's external-data file ({os.path.basename(data)}); "
                                 "the report would overwrite the rewritten model's weights")
    report_fmt = _report_format(report_file, fmt)
    _warn_metric(metric, fmt, report_fmt if report_file else fmt)
    if dry_run and report_fmt in ("netron", "model-explorer"):
        click.echo(f"sepify: warning: --dry-run: the {report_fmt} file describes the rewritten model's nodes "
                   "(conv/depthwise, ...), and no rewritten model is written to open it with", err=True)
    _check_viewer_format(fmt)
    _check_viewer_format(report_fmt)
    shapes, dims = _shapes_and_dims(input_shape, dim)
    opts = RewriteOptions(
        rank=rank, energy=energy, max_error=max_error,
        target_macs=parse_quantity(target_macs, "--target-macs") if target_macs is not None else None,
        target_ratio=parse_fraction(target_ratio, "--target-ratio") if target_ratio is not None else None,
        orientation=orientation, form=form, objective=latency["objective"], target_speedup=latency["target_speedup"], threads=latency["threads"],
        clock=latency["clock"], latency_passes=latency["latency_passes"],
        include=include, exclude=exclude, allow_increase=allow_increase,
        fold_batchnorm=not no_fold_bn, holdout=_holdout_value(holdout), calib_rows=calib_rows,
        calib_method=calib_method, sequential=not no_sequential, calib_seed=seed, sensitivity=sensitivity,
        sensitivity_samples=sensitivity_samples, sensitivity_ranks=_ranks_list(sensitivity_ranks), distortion=distortion, cache_dir=cache_dir, cache=not no_cache,
        refit_kept=not no_refit_kept, residual_target=not no_residual_target, calib_cache_mb=calib_cache_mb,
        providers=tuple(p for p in (providers or "").split(",") if p.strip()))
    if providers is not None and not opts.providers:
        raise UsageError("--providers: give a comma-separated list, e.g. CUDA,CPU")
    if calibration is None and any(v != d for v, d in ((holdout, "0.2"), (calib_rows, 16384), (calib_method, "als"),
                                                        (no_sequential, False), (sensitivity, "measured"),
                                                        (sensitivity_samples, 16), (sensitivity_ranks, "1,2,4"), (distortion, "auto"),
                                                        (cache_dir, None), (no_cache, False), (no_refit_kept, False),
                                                        (no_residual_target, False), (calib_cache_mb, 2048))):
        raise UsageError("--holdout, --calib-rows, --calib-method, --no-sequential, --sensitivity, "
                         "--sensitivity-samples, --sensitivity-ranks, --distortion, --cache-dir, --no-cache, --no-refit-kept, "
                         "--no-residual-target and --calib-cache-mb need --calibration")
    do_verify = do_verify or tolerance is not None or bool(inputs_file) or verify_layers
    samples = source = None
    if do_verify:  # read and check the data before the work: a bad file is one line, exit 2
        from .rewrite.data import model_inputs
        from .rewrite.verify import load_samples, random_samples
        from .model.reading import read_model

        specs = model_inputs(read_model(model, load_external_data=False, copy=False)[0], shapes)
        if inputs_file:
            samples = load_samples(inputs_file, specs)
            source = f"--inputs {inputs_file}"
        elif calibration is None:
            random_samples(specs, dims, seed)  # unbound spatial dims: exit 2 now, not after the rewrite
    progress = (lambda message: click.echo(message, err=True)) if calibration and sys.stderr.isatty() else None
    result = run(model, opts, input_shapes=shapes, dims=dims, calibration=calibration, progress=progress)
    _warn_unused_dims(model, result.report.get("unused_dims") or [])
    if do_verify and samples is None and result.calibration is not None and len(result.calibration.holdout):
        samples = result.calibration.holdout  # the held-out calibration samples, never used to fit (all of them)
        source = "calibration holdout (never used to fit)"
    elif do_verify and samples is None and calibration is not None:
        from .rewrite.data import model_inputs
        from .rewrite.verify import random_samples
        from .model.reading import read_model

        random_samples(model_inputs(read_model(model, load_external_data=False, copy=False)[0], shapes), dims, seed)
    failed = saved = False
    if do_verify:
        from .rewrite.verify import verify

        if result.external_data:  # run the rewritten model from disk, beside its weights
            if not output or dry_run:
                raise UsageError("--verify of a model with external data needs -o (the rewritten model is run from disk)")
            result.save(output, inputs)
            saved = True
        rewritten = output if result.external_data else result.model
        ver = verify(model, rewritten, samples, source=source, dims=dims, input_shapes=shapes, seed=seed,
                     layers=result.report["layers"] if verify_layers else None, tolerance=tolerance,
                     providers=opts.providers)
        if samples is None and calibration is not None:
            ver["notes"].append("no held-out calibration samples (--holdout 0): a random smoke test instead; "
                                "raise --holdout or give --inputs to measure")
        result.report["verification"] = ver
        failed = ver["passed"] is False
    if output and not dry_run and not saved:
        result.save(output, inputs)  # (the report then names the file and its size)
    if output and not dry_run and result.external_data:
        result.measure_saved(output)  # end-to-end latency from the saved files
    from .render.rewrite import render_rewrite

    if report_file:
        if report_fmt in VIEWER_FORMATS:
            _emit(_viewer_text(result.report, report_fmt, metric), report_file, inputs)
        else:
            _render(lambda stream: render_rewrite(result.report, report_fmt, stream), report_file, inputs)
    if fmt in VIEWER_FORMATS and not report_file:
        _emit(_viewer_text(result.report, fmt, metric), None)
    else:
        stdout_fmt = "table" if fmt in VIEWER_FORMATS else fmt
        _render(lambda stream: render_rewrite(result.report, stdout_fmt, stream), None)
    if failed:
        err = result.report["verification"]["checked_error"]
        click.echo(f"sepify: verification failed: checked error {'non-finite' if err is None else f'{err:.4g}'} "
                   f"> tolerance {tolerance:g}", err=True)
        sys.exit(EXIT_FAILED)


def _report_format(report_file: str | None, fmt: str) -> str:
    """The format of ``rewrite --report FILE``: HTML for ``.html``/``.htm`` whatever ``--format``
    is; under the default ``--format table`` a ``.json`` / ``.md`` file gets JSON / Markdown (a
    terminal table is no file format); else ``--format``'s."""
    name = (report_file or "").lower()
    if name.endswith((".html", ".htm")):
        return "html"
    if fmt == "table" and name.endswith(".json"):
        return "json"
    if fmt == "table" and name.endswith((".md", ".markdown")):
        return "markdown"
    return fmt


@main.command("check")
@click.argument("models", nargs=-1, type=click.Path(dir_okay=True))
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="Config file (sepify.toml, or a pyproject.toml with [tool.sepify]). "
                   "Default: the nearest pyproject.toml with [tool.sepify] above the current directory.")
@click.option("--no-config", is_flag=True, help="Do not look for a config file.")
@click.option("--max-macs", metavar="N", help="Total MACs, e.g. 600M.")
@click.option("--max-flops", metavar="N", help="Total FLOPs, e.g. 1.2G.")
@click.option("--max-params", metavar="N", help="Parameters, e.g. 4.5M.")
@click.option("--max-layer-macs", metavar="N", help="MACs of the heaviest single layer, e.g. 50M.")
@click.option("--max-activation-peak", metavar="BYTES", help="Peak live activation memory, e.g. 8MiB.")
@click.option("--max-file-size", metavar="BYTES", help="Model file size, e.g. 20MB.")
@click.option("--max-unknown", metavar="N", help="Nodes of unknown cost allowed (default 0).")
@click.option("--baseline", metavar="FILE",
              help="Analyze JSON (sepify analyze --format json) or model file to compare against; {stem}/{name} "
                   "are replaced by the model's file stem/name.")
@click.option("--max-growth", "max_growth", multiple=True, metavar="[QUANTITY=]PCT",
              help="Largest relative increase vs the baseline, e.g. 2% (MACs, params and every budgeted "
                   "quantity) or file-size=5% (repeatable).")
@_input_shape_opt
@_dim_opt
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table",
              show_default=True, help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to this file (atomically).")
@click.option("--junit", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write a JUnit XML report (one testcase per model x budget).")
@_handle_errors
def check_cmd(models, config, no_config, max_macs, max_flops, max_params, max_layer_macs, max_activation_peak,
              max_file_size, max_unknown, baseline, max_growth, input_shape, dim, fmt, output, junit):
    """Check MODELS against cost budgets (flags, or [tool.sepify] in pyproject.toml).

    With no MODELS, checks every model matched by the config's [[tool.sepify.models]] paths.
    Exit codes: 0 every model within budget, 1 a budget exceeded, 2 usage, config or model error.
    Under GITHUB_ACTIONS=true, also prints ::error annotations and appends a summary to
    $GITHUB_STEP_SUMMARY. See docs/ci.md.
    """
    import os

    from .check import check as run
    from .render.check import github_report, render_check, write_junit

    from .errors import UsageError

    if config and no_config:
        raise UsageError("--config and --no-config exclude each other")
    if junit == "-":
        raise UsageError("--junit -: give the JUnit report a file name (stdout carries the --format report)")
    from .fileio import Inputs

    # the models and baselines the config names are known after the check: refused again then
    inputs = Inputs().add(config, "the config file").add(baseline, "the baseline")
    for m in models:
        inputs.add_model(m, "a checked model")
    _guard(inputs, {"-o": output, "--junit": junit})
    shapes, dims = _shapes_and_dims(input_shape, dim)
    limits = {"macs": max_macs, "flops": max_flops, "params": max_params, "layer_macs": max_layer_macs,
              "activation_peak": max_activation_peak, "file_size": max_file_size, "unknown": max_unknown}
    report = run(models, config=config, discover=not no_config, limits=limits, max_growth=list(max_growth) or None,
                 baseline=baseline, input_shapes=shapes, dims=dims)
    data = report.to_dict()
    for path, role in report.inputs:
        (inputs.add_model if role in ("a checked model", "the baseline") else inputs.add)(path, role)
    _guard(inputs, {"-o": output, "--junit": junit})
    to_file = bool(output and output != "-")
    on_stderr = fmt == "table" and not to_file  # the table names the errors; stderr has the lines
    _render(lambda stream: render_check(data, fmt, stream, on_stderr), output, inputs)
    if junit:
        write_junit(data, junit, inputs)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        # annotations go to stdout, unless stdout carries the JSON report (the runner reads stderr too)
        github_report(data, stream=sys.stderr if fmt == "json" and not to_file else sys.stdout)
    for w in data["warnings"]:
        click.echo(f"sepify: warning: {w}", err=True)
    for m in data["models"]:  # like every command: a model error is one line on stderr
        if m["status"] == "error":
            click.echo(f"sepify: error: {m['error']}", err=True)
    sys.exit(report.exit_code)


@main.command("diff")
@click.argument("old", type=click.Path(dir_okay=True))
@click.argument("new", type=click.Path(dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown", "html"]), default="table",
              show_default=True, help="Output format (html: a self-contained page with the per-layer deltas).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to this file (atomically).")
@click.option("--all", "show_all", is_flag=True, help="Also list unchanged layers (table and markdown).")
@click.option("--sort", type=click.Choice(["graph", "delta"]), default="graph", show_default=True,
              help="Row order: graph order, or largest MAC change first.")
@click.option("--top", type=click.IntRange(min=1), help="Only the first N rows (table and markdown).")
@click.option("--map", "maps", multiple=True, metavar="OLD=NEW[,NEW...]",
              help="Match layer OLD to the new layer(s) NEW explicitly (repeatable).")
@click.option("--no-position-match", is_flag=True,
              help="Match layers by name (and the X -> X/... split rule) only, not by position and op type.")
@_input_shape_opt
@click.option("--old-input-shape", "old_input_shape", multiple=True, metavar="NAME=1x3x224x224",
              help="Override the shape of an input of OLD only (repeatable; wins over --input-shape).")
@click.option("--new-input-shape", "new_input_shape", multiple=True, metavar="NAME=1x3x224x224",
              help="Override the shape of an input of NEW only (repeatable; wins over --input-shape).")
@_dim_opt
@_handle_errors
def diff_cmd(old, new, fmt, output, show_all, sort, top, maps, no_position_match, input_shape, old_input_shape,
             new_input_shape, dim):
    """Layer-by-layer cost comparison of OLD and NEW (models or `sepify analyze --format json` files)."""
    from .diff import compare, parse_mapping
    from .render.diff import render_diff

    from .fileio import Inputs

    inputs = _guard(Inputs().add_model(old, "the old model").add_model(new, "the new model"), {"-o": output})
    _check_viewer_format(fmt)
    if fmt not in ("table", "markdown"):
        _warn_table_options(fmt, {"--all": show_all, "--top": top, "--sort": sort != "graph"}, "the table and Markdown")
    shapes, dims = _shapes_and_dims(input_shape, dim)
    from .units import parse_input_shape

    old_shapes = dict(parse_input_shape(s, "--old-input-shape") for s in old_input_shape)
    new_shapes = dict(parse_input_shape(s, "--new-input-shape") for s in new_input_shape)
    result = compare(old, new, mapping=parse_mapping(maps), positional=not no_position_match,
                     input_shapes=shapes, dims=dims, old_input_shapes=old_shapes, new_input_shapes=new_shapes)
    for w in result.warnings:
        click.echo(f"sepify: warning: {w}", err=True)
    data = result.to_dict()
    if fmt == "html":
        _emit(_viewer_text(data, fmt), output, inputs)
    else:
        _render(lambda stream: render_diff(data, fmt, stream, show_all, sort, top), output, inputs)


if __name__ == "__main__":  # pragma: no cover
    main()
