"""benchmarks/gpu_suite.py: the same code as the real-size GPU run, at tiny sizes on the CPU; every row gets a number
(the 4-bit one: a number, or why it was skipped), written between the markers of a RESULTS file (a temp one here)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_suite", None)


def _table(text: str, suite) -> dict[str, str]:
    """figure -> measured cell, from the section between the markers."""
    body = text.split(suite.BEGIN, 1)[1].split(suite.END, 1)[0]
    cells = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    return {c[0].strip(): c[1].strip() for c in cells[1:]}


def test_tiny_run_fills_every_row(suite, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    stale = f"{suite.BEGIN}\n## an old gpu run\n| figure | measured |\n{suite.END}"
    results.write_text(f"# Benchmark results\n\nEarlier rows stay.\n\n{stale}\n\n## after\n\nkept too\n")
    suite.main(["--tiny", "--results", str(results), "--workdir", str(tmp_path / "work")])
    text = results.read_text()
    assert text.count(suite.BEGIN) == 1 and "an old gpu run" not in text
    assert "Earlier rows stay." in text and text.rstrip().endswith("kept too")
    assert "transformers " + __import__("transformers").__version__ in text and "torch " in text
    table = _table(text, suite)
    rows = suite.make_rows(suite.TINY)
    assert set(table) == {r.figure for r in rows.values()}
    number = re.compile(r"^[0-9][0-9,]*(\.[0-9]+)?(e[-+]?[0-9]+)? ")
    for key, row in rows.items():
        cell = table[row.figure]
        if key == "peak_4bit" and not torch.cuda.is_available():
            assert cell.startswith("skipped:") and "CUDA" in cell, cell     # says why
        else:
            assert number.match(cell), (key, cell)
    assert float(table[rows["eval_ratio"].figure].split()[0].replace(",", "")) > 1   # grouped beats naive even tiny
    assert "same answers 7/7" in table[rows["eval_ratio"].figure]
    printed = capsys.readouterr().out
    for row in rows.values():
        assert row.figure in printed and f"target {row.target}" in printed
    assert (tmp_path / "work" / "tiny-tiny" / "model.safetensors").is_file()   # the checkpoint the load row timed


def test_real_sizes_skip_cleanly_without_cuda(suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = tmp_path / "RESULTS.md"
    assert suite.main(["--results", str(results)]) == 0
    assert "skipped: CUDA is not available" in capsys.readouterr().out
    assert not results.exists()


def test_materialise_makes_real_shared_weights_from_meta(suite):
    from accelerate import init_empty_weights
    from torch import nn

    with init_empty_weights(include_buffers=False):
        net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4))
        net.register_buffer("scale", torch.full((2,), 3.0))
    net.extra = nn.Linear(4, 8)
    net.extra.weight = net[0].weight                                      # a tied weight stays tied
    assert net[0].weight.is_meta and not net.scale.is_meta
    suite.materialise(net, torch.device("cpu"), torch.bfloat16)
    assert not any(p.is_meta for p in net.parameters())
    assert net.extra.weight is net[0].weight and net[0].weight.dtype == torch.bfloat16
    assert torch.equal(net[1].weight, torch.ones(8, dtype=torch.bfloat16)) and not net[0].bias.any()
    assert 0.01 < net[0].weight.float().std().item() < 0.03
    assert torch.equal(net.scale, torch.full((2,), 3.0))                   # buffers kept (dtype too)
