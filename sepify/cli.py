"""The command line: a thin layer over the Python API.

Exit codes: 0 success; 1 a budget exceeded / verification above tolerance; 2 usage, config or
model error; 3 an internal error (a bug: please report it with ``--debug`` output).
"""

from __future__ import annotations

import functools
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
            return fn(*args, **kwargs)
        except SepifyError as e:
            if _State.debug:
                raise
            click.echo(f"sepify: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("sepify: interrupted", err=True)
            sys.exit(130)
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


def _emit(text: str | None, output: str | None) -> None:
    if text is None:
        return
    if output and output != "-":
        from .fileio import write_text

        write_text(output, text)
    else:
        click.echo(text, nl=False)


def _shapes_and_dims(input_shape: tuple[str, ...], dim: tuple[str, ...]):
    from .loading import parse_dim, parse_input_shape

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
    3 internal error.
    """
    _State.debug = debug


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown"]), default="table",
              show_default=True, help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to this file (atomically).")
@_input_shape_opt
@_dim_opt
@click.option("--by-op", is_flag=True, help="Group rows by op type.")
@click.option("--top", type=click.IntRange(min=1), help="Only the N heaviest rows (by --sort, default MACs).")
@click.option("--sort", type=click.Choice(["graph", "macs", "flops", "params", "output_bytes", "name"]),
              default="graph", show_default=True, help="Row order.")
@_handle_errors
def analyze(model, fmt, output, input_shape, dim, by_op, top, sort):
    """Per-layer and total MACs, FLOPs, parameters and activation sizes of MODEL."""
    from .analysis import analyze as run
    from .report import render_analysis

    shapes, dims = _shapes_and_dims(input_shape, dim)
    result = run(model, input_shapes=shapes, dims=dims)
    data = result.to_dict()
    if fmt == "table" and output and output != "-":
        import io

        buf = io.StringIO()
        render_analysis(data, "table", buf, sort, top, by_op)
        _emit(buf.getvalue(), output)
        return
    _emit(render_analysis(data, fmt, sys.stdout, sort, top, by_op), output)


if __name__ == "__main__":  # pragma: no cover
    main()
