"""Interrupting ``sepify rewrite`` (Ctrl-C / SIGTERM) never damages the previous output and leaves
no temporary file behind (issue 5)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import onnx
import pytest
from click.testing import CliRunner

from sepify.cli import main


def _restore_sigint():
    """In the child, before exec: SIGINT back to its default disposition. A process started in
    the background by a non-interactive shell (``nohup bash .ci/run &``) has SIGINT ignored,
    and a child inherits that: Python then installs no KeyboardInterrupt handler and a Ctrl-C
    never reaches it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args, **kwargs) -> subprocess.Popen:
    """Start a child that receives SIGINT as from a terminal, however the suite was started."""
    return subprocess.Popen(args, preexec_fn=_restore_sigint, **kwargs)


def test_children_get_sigint_even_when_the_suite_ignores_it():
    """The suite started with SIGINT ignored (as from ``nohup bash .ci/run &``): the children
    of the signal test still get Python's KeyboardInterrupt handler."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
        proc = _spawn([sys.executable, "-c", probe], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out.strip() == b"True"


def _temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_interrupt_during_the_write_keeps_the_previous_output(tmp_path, samples_dir, monkeypatch, where):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")
    import sepify.fileio as fileio

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # the temporary file is complete when fsync runs; os.replace is the commit point
    monkeypatch.setattr(fileio.os, where, interrupt)
    r = CliRunner().invoke(main, ["rewrite", str(samples_dir / "tiny_cnn.onnx"), "-o", str(out)])
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.stderr and "Traceback" not in r.output
    assert out.read_bytes() == b"previous output"
    assert _temp_files(tmp_path) == []


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_real_signals_at_many_moments(tmp_path, make_samples, sig):
    """Conv MobileNet (117 MB): a rewrite takes ~1.5 s here; signals at moments spread over
    loading, factorizing and writing. Afterwards the output is either the previous file, byte for
    byte, or a complete model that passes the checker; never a temporary file."""
    src = tmp_path / "conv_mobilenet.onnx"
    onnx.save(make_samples.mobilenet_v1(conv_only=True), str(src))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.sep.onnx"
    previous = b"previous output"
    codes = set()
    # from 0.6 s: earlier, the interpreter may still be starting (site-packages), before sepify runs
    for delay in (0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.9):
        out.write_bytes(previous)
        proc = _spawn([sys.executable, "-m", "sepify", "rewrite", str(src), "-o", str(out), "--format", "json"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        codes.add(proc.returncode)
        assert proc.returncode in (0, 130, 143, -sig), err
        assert b"Traceback" not in err
        data = out.read_bytes()
        if data != previous:  # the rewrite had committed: the new file must be whole
            onnx.checker.check_model(str(out), full_check=True)
        assert _temp_files(out_dir) == []
    assert codes - {0}, "no run was interrupted: the delays no longer cover the rewrite"


def test_interrupt_between_the_two_renames_of_an_external_data_output(tmp_path, make_samples, monkeypatch):
    """A model with external data is a pair of files. The new data file gets a name the previous
    model does not read, so an interruption after the data rename and before the model rename
    leaves the previous pair whole and loadable."""
    import numpy as np
    import onnxruntime as ort

    import sepify
    import sepify.fileio as fileio

    src = tmp_path / "src" / "tiny.onnx"
    src.parent.mkdir()
    onnx.save_model(make_samples.tiny_cnn(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tiny.onnx.data", size_threshold=0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "tiny.sep.onnx"
    sepify.rewrite(str(src), rank="full", allow_increase=True).save(out)  # the previous output
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert len(before) == 2  # model + one data file

    real_replace = fileio.os.replace
    calls = []

    def replace_then_interrupt(a, b):
        calls.append(b)
        if len(calls) == 2:  # the data file is in place; the model rename is next
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(fileio.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sepify.rewrite(str(src), rank=1).save(out)
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    # the previous files are untouched (a new data file may stand beside them) and no temp is left
    for name, data in before.items():
        assert (out_dir / name).read_bytes() == data
    assert _temp_files(out_dir) == []
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(out), run(src), rtol=1e-4, atol=1e-5)  # still the full-rank (exact) pair

    # a completed save replaces the pair and removes the previous data file
    sepify.rewrite(str(src), rank=1).save(out)
    names = sorted(p.name for p in out_dir.iterdir())
    assert len(names) == 2 and "tiny.sep.onnx" in names, names
    onnx.checker.check_model(str(out), full_check=True)
