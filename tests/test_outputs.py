"""Outputs a user can trust (issue 10, items 1 and 2): no command writes over one of its inputs,
and output files get the permissions a new file gets under the umask.

Every case runs the real command line on real files in a temporary folder and then looks at
the files: the input's bytes, the exit code, the one line on stderr, the modes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from sepify.cli import main

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "samples") not in sys.path:
    sys.path.insert(0, str(ROOT / "samples"))
import make_samples  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """tmp_path as the current directory, holding m.onnx (tiny_cnn) and other.onnx."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(make_samples.tiny_cnn().SerializeToString())
    (tmp_path / "other.onnx").write_bytes(make_samples.worked_example().SerializeToString())
    return tmp_path


@pytest.fixture
def umask():
    """Set the process umask for the test (restored after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


# --- item 1: no output lands on an input ------------------------------------------------------
COMMANDS = {
    "analyze -o": ["analyze", "m.onnx", "--format", "json", "-o", "{out}"],
    "check -o": ["check", "m.onnx", "--no-config", "--max-macs", "1G", "-o", "{out}"],
    "check --junit": ["check", "m.onnx", "--no-config", "--max-macs", "1G", "--junit", "{out}"],
    "diff -o": ["diff", "other.onnx", "m.onnx", "-o", "{out}"],
    "rewrite --report": ["rewrite", "m.onnx", "-o", "new.onnx", "--report", "{out}"],
    "rewrite -o": ["rewrite", "m.onnx", "-o", "{out}"],
}
SPELLINGS = {
    "same path": lambda d: "m.onnx",
    "./ spelling": lambda d: "./m.onnx",
    "through the parent": lambda d: f"../{d.name}/m.onnx",
    "absolute": lambda d: str(d / "m.onnx"),
    "hard link": lambda d: (os.link(d / "m.onnx", d / "hard.onnx"), "hard.onnx")[1],
    "symbolic link": lambda d: (os.symlink("m.onnx", d / "sym.onnx"), "sym.onnx")[1],
}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("command", COMMANDS)
def test_no_writer_overwrites_the_input_model(folder, command, spelling):
    out = SPELLINGS[spelling](folder)
    before = _snapshot(folder)
    r = run(*[a.format(out=out) for a in COMMANDS[command]])
    assert r.exit_code == 2
    option = command.split()[1]
    assert r.stderr.splitlines() == [f"sepify: error: {out}: {option} is "
                                     + ("the new model" if command == "diff -o" else
                                        "a checked model" if command.startswith("check") else "the input model")
                                     + (" (m.onnx)" if "link" in spelling else "")
                                     + "; refusing to overwrite an input"]
    assert _snapshot(folder) == before  # nothing written, nothing removed
    assert not (folder / "new.onnx").exists()  # refused before the work


def test_diff_refuses_the_new_model_too(folder):
    r = run("diff", "other.onnx", "m.onnx", "-o", "./other.onnx")
    assert r.exit_code == 2 and r.stderr == "sepify: error: ./other.onnx: -o is the old model; refusing to overwrite an input\n"
    r = run("diff", "other.onnx", "m.onnx", "-o", "m.onnx")
    assert r.exit_code == 2 and r.stderr == "sepify: error: m.onnx: -o is the new model; refusing to overwrite an input\n"


def _external(folder: Path) -> Path:
    model = make_samples.tiny_cnn()
    onnx.save_model(model, str(folder / "ext.onnx"), save_as_external_data=True, location="ext.bin",
                    size_threshold=0)
    return folder / "ext.onnx"


@pytest.mark.parametrize("command", ["analyze", "rewrite-report", "rewrite-model", "check-junit"])
def test_external_data_file_of_the_input_is_refused(folder, command):
    _external(folder)
    os.link(folder / "ext.bin", folder / "weights-link.bin")
    before = _snapshot(folder)
    args = {"analyze": ["analyze", "ext.onnx", "--format", "csv", "-o", "weights-link.bin"],
            "rewrite-report": ["rewrite", "ext.onnx", "-o", "new.onnx", "--report", "./ext.bin"],
            "rewrite-model": ["rewrite", "ext.onnx", "-o", "ext.bin"],
            "check-junit": ["check", "ext.onnx", "--no-config", "--junit", "ext.bin"]}[command]
    r = run(*args)
    assert r.exit_code == 2
    assert len(r.stderr.splitlines()) == 1
    role = "a checked model" if command.startswith("check") else "the input model"
    assert f"is an external-data file of {role} ext.onnx" in r.stderr and "refusing to overwrite an input" in r.stderr
    assert _snapshot(folder) == before


def test_rewritten_data_file_never_lands_on_the_input_data(folder):
    """The output's data file names are OUT.data / OUT.alt.data: one that is (a hard link of)
    the input's data file is not chosen; when both are, the rewrite is refused."""
    src = _external(folder)
    os.link(folder / "ext.bin", folder / "new.onnx.data")
    before = _snapshot(folder)
    r = run("rewrite", src, "-o", "new.onnx")
    assert r.exit_code == 0, r.output
    header = onnx.load("new.onnx", load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"new.onnx.alt.data"}
    assert (folder / "ext.bin").read_bytes() == before["ext.bin"] == (folder / "new.onnx.data").read_bytes()
    os.remove("new.onnx")
    os.remove("new.onnx.alt.data")
    os.link(folder / "ext.bin", folder / "new.onnx.alt.data")
    r = run("rewrite", src, "-o", "new.onnx")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    assert "both data file names new.onnx.data and new.onnx.alt.data are inputs" in r.stderr
    assert (folder / "ext.bin").read_bytes() == before["ext.bin"]
    assert not (folder / "new.onnx").exists()


def test_check_refuses_baseline_and_config(folder):
    base = run("analyze", "m.onnx", "--format", "json", "-o", "base.json")
    assert base.exit_code == 0
    (folder / "budgets.toml").write_text('[project]\nname = "x"\n[tool.sepify]\nmax-macs = "1G"\n')
    before = _snapshot(folder)
    r = run("check", "m.onnx", "--baseline", "base.json", "--no-config", "-o", "./base.json")
    assert (r.exit_code, r.stderr) == (2, "sepify: error: ./base.json: -o is the baseline; refusing to overwrite an input\n")
    r = run("check", "m.onnx", "--config", "budgets.toml", "--junit", "budgets.toml")
    assert (r.exit_code, r.stderr) == (2, "sepify: error: budgets.toml: --junit is the config file; refusing to overwrite an input\n")
    assert _snapshot(folder) == before


def test_check_refuses_what_the_config_names(folder):
    """Models found by a config glob and baselines from its template are inputs too."""
    (folder / "models").mkdir()
    os.replace("m.onnx", "models/m.onnx")
    (folder / "baselines").mkdir()
    assert run("analyze", "models/m.onnx", "--format", "json", "-o", "baselines/m.json").exit_code == 0
    (folder / "pyproject.toml").write_text('[tool.sepify]\nbaseline = "baselines/{stem}.json"\nmax-growth = "5%"\n'
                                           '[[tool.sepify.models]]\npath = "models/*.onnx"\n')
    before = {**_snapshot(folder / "models"), **_snapshot(folder / "baselines")}
    r = run("check", "--junit", "baselines/m.json")
    assert (r.exit_code, r.stderr) == (2, "sepify: error: baselines/m.json: --junit is the baseline; refusing to overwrite an input\n")
    r = run("check", "-o", "models/./m.onnx")
    assert (r.exit_code, r.stderr) == (2, "sepify: error: models/./m.onnx: -o is a checked model; "
                                          "refusing to overwrite an input\n")
    assert {**_snapshot(folder / "models"), **_snapshot(folder / "baselines")} == before
    assert run("check", "--junit", "report.xml").exit_code == 0  # and a real output is written


def test_rewrite_refuses_the_inputs_file_and_two_options_on_one_file(folder):
    np.savez(folder / "feeds.npz", input=np.zeros((1, 3, 32, 32), np.float32))
    before = _snapshot(folder)
    r = run("rewrite", "m.onnx", "-o", "feeds.npz", "--verify", "--inputs", "feeds.npz")
    assert (r.exit_code, r.stderr) == (2, "sepify: error: feeds.npz: -o is the --inputs file; refusing to overwrite an input\n")
    r = run("rewrite", "m.onnx", "-o", "new.onnx", "--report", "./new.onnx")
    assert (r.exit_code, r.stderr) == (2, "sepify: error: ./new.onnx: -o and --report name the same file\n")
    r = run("check", "m.onnx", "--no-config", "-o", "r.xml", "--junit", "r.xml")
    assert (r.exit_code, r.stderr) == (2, "sepify: error: r.xml: -o and --junit name the same file\n")
    assert _snapshot(folder) == before


def test_python_api_save_refuses_the_source_data_file(folder):
    import sepify

    src = _external(folder)
    result = sepify.rewrite(str(src), rank=1)
    before = _snapshot(folder)
    with pytest.raises(sepify.UsageError, match="is an external-data file of the input model"):
        result.save(folder / "ext.bin")
    assert _snapshot(folder) == before


# --- item 2: permissions ---------------------------------------------------------------------
def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_new_outputs_get_the_umask_mode(folder, umask, mask, expected):
    umask(mask)
    _external(folder)
    assert run("analyze", "m.onnx", "--format", "json", "-o", "a.json").exit_code == 0
    assert run("check", "m.onnx", "--no-config", "--max-macs", "1G", "-o", "c.md", "--format", "markdown",
               "--junit", "c.xml").exit_code == 0
    assert run("diff", "m.onnx", "other.onnx", "-o", "d.json", "--format", "json").exit_code == 0
    assert run("rewrite", "m.onnx", "-o", "r.onnx", "--report", "r.json", "--format", "json").exit_code == 0
    assert run("rewrite", "ext.onnx", "-o", "e.onnx").exit_code == 0
    outputs = ["a.json", "c.md", "c.xml", "d.json", "r.onnx", "r.json", "e.onnx", "e.onnx.data"]
    assert {f: oct(_mode(f)) for f in outputs} == {f: oct(expected) for f in outputs}
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left


def test_overwritten_output_keeps_its_mode_and_is_replaced_atomically(folder, umask):
    for name, mode in (("a.json", 0o600), ("r.onnx", 0o664), ("c.xml", 0o640)):
        Path(name).write_text("old\n")
        os.chmod(name, mode)
        os.link(name, name + ".keep")  # the old file, still reachable: a new inode must replace it
    assert run("analyze", "m.onnx", "--format", "json", "-o", "a.json").exit_code == 0
    assert run("rewrite", "m.onnx", "-o", "r.onnx").exit_code == 0
    assert run("check", "m.onnx", "--no-config", "--junit", "c.xml").exit_code == 0
    for name, mode in (("a.json", 0o600), ("r.onnx", 0o664), ("c.xml", 0o640)):
        assert _mode(name) == mode
        assert Path(name + ".keep").read_text() == "old\n"  # not written in place
        assert os.stat(name).st_ino != os.stat(name + ".keep").st_ino
    assert json.loads(Path("a.json").read_text())["schema"] == "sepify.analysis/1"
    onnx.checker.check_model("r.onnx")
