"""The UTD=20 report's generated doc blocks (benchmarks/utd20/docs.py, utd20 --report-only)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import utd20
from benchmarks.utd20.docs import markers, replace_block
from tests.test_utd20 import _fake_unit

BEGIN, END = markers("utd20:cpu")


def test_replace_block_rewrites_only_between_the_markers():
    text = f"intro\n{BEGIN}\nold line\n{END}\noutro\n"
    new = replace_block(text, "utd20:cpu", "fresh 1\nfresh 2\n")
    assert new == f"intro\n{BEGIN}\nfresh 1\nfresh 2\n{END}\noutro\n"
    assert replace_block(new, "utd20:cpu", "fresh 1\nfresh 2") == new            # idempotent
    assert replace_block("no block here\n", "utd20:cpu", "x") is None
    assert replace_block(text, "utd20:other", "x") is None                       # another block's name
    for bad in (f"{END}\n{BEGIN}\n", f"{BEGIN}\n{BEGIN}\n{END}\n", f"{BEGIN}\nno end\n"):
        with pytest.raises(ValueError, match="expected one"):
            replace_block(bad, "utd20:cpu", "x")


def _campaign(tmp_path):
    """A cpu-like preset whose own results root is ``tmp_path/cpu`` with a few finished units."""
    out = tmp_path / "cpu"
    preset = dataclasses.replace(utd20.PRESETS["cpu"], default_out=str(out))
    for seed, final in ((0, 40.0), (1, 70.0)):
        _fake_unit(out, preset, "cheetah-run", "sac_utd20", seed, final)
    _fake_unit(out, preset, "cheetah-run", "synther_utd20", 0, 115.0)
    _fake_unit(out, preset, "cheetah-run", "pgr_utd20", 0, 90.0)                 # an opt-in arm
    _fake_unit(out, preset, "walker-walk", "sac_utd1", 0, 25.0)
    return preset, out, utd20.write_report(out, reps=50)


def test_report_fills_the_docs_block_from_the_units(tmp_path):
    preset, out, summary = _campaign(tmp_path)
    readme = tmp_path / "README.md"
    nested = tmp_path / "benchmarks" / "UTD20.md"
    nested.parent.mkdir()
    untouched = tmp_path / "OTHER.md"
    for doc in (readme, nested):
        doc.write_text(f"# Title\n\nkept above\n\n{BEGIN}\nstale table\n{END}\n\nkept below\n")
    untouched.write_text("no markers\n")
    changed = utd20.cli._update_docs(preset, out, summary, docs=[readme, nested, untouched, tmp_path / "missing.md"])
    assert changed == [readme, nested]
    text = readme.read_text()
    assert text.startswith("# Title\n\nkept above\n\n" + BEGIN) and text.endswith(END + "\n\nkept below\n")
    assert "stale table" not in text and untouched.read_text() == "no markers\n"
    body = text[text.index(BEGIN):text.index(END)]
    assert "Finished: 4 of the 24 planned units, plus 1 of opt-in arms" in body
    returns_table = body[body.index("| arm | cheetah-run"):].split("\n\n")[0]
    assert returns_table.startswith("| arm | cheetah-run | reacher-hard | walker-walk |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in returns_table.splitlines()}
    assert rows["SAC (UTD=20)"].startswith("| SAC (UTD=20) | 55.0 +- 21.2 (40.0 / 70.0) | not yet | not yet |")
    assert "| 115.0 (seed 0) |" in rows["SAC (SynthER, UTD=20)"]
    # the steadier statistic: each run's mean over its last 3 evaluations (fakes: 0, final/2, final)
    late_table = body[body.index("last three evaluations"):].split("\n\n")[1]
    late = {line.split(" | ")[0].lstrip("| "): line for line in late_table.splitlines()}
    assert late["SAC (UTD=20)"].startswith("| SAC (UTD=20) | 27.5 +- 10.6 (20.0 / 35.0) | not yet | not yet |")
    assert late["SAC (PGR curiosity, UTD=20)"].endswith("| 45.0 (seed 0) | - | - |")
    assert rows["REDQ (UTD=20)"].endswith("| not yet | - | - |")                    # planned on cheetah-run only
    assert rows["SAC (PGR curiosity, UTD=20)"].endswith("| 90.0 (seed 0) | - | - |")
    assert "cheetah-run SAC (UTD=20) 347" in body                                   # the paper, for orientation
    assert "](cpu/curves_cheetah-run.png)" in body                              # relative to README.md
    assert "](../cpu/curves_cheetah-run.png)" in nested.read_text()             # relative to benchmarks/
    assert utd20.cli._update_docs(preset, out, summary, docs=[readme, nested]) == []   # nothing new: unchanged


def test_report_elsewhere_leaves_the_docs_alone(tmp_path):
    preset, out, summary = _campaign(tmp_path)
    doc = tmp_path / "README.md"
    doc.write_text(f"{BEGIN}\nold\n{END}\n")
    other = dataclasses.replace(preset, default_out=str(tmp_path / "elsewhere" / "cpu"))   # same block name
    assert utd20.cli._update_docs(other, out, summary, docs=[doc]) == []
    assert doc.read_text() == f"{BEGIN}\nold\n{END}\n"


def test_committed_docs_carry_the_cpu_block():
    for doc in utd20.DOCS:
        assert replace_block(doc.read_text(), "utd20:cpu", "x") is not None, doc
