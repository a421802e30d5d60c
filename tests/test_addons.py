"""The add-on seam: a checkpoint names its add-ons as data, the package that defines one registers it, the core
finds it without importing that package, and a predictor can change them."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkpoints_addons_round_trip_and_bad_ones_name_what_is_wrong(tiny, tmp_path):
    from grounding.addons import build_addons
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from grounding.errors import CheckpointError

    model, tok = tiny
    with pytest.raises(CheckpointError, match="unknown add-on 'sharpen'"):
        build_addons({"sharpen": {}})
    with pytest.raises(CheckpointError, match="add-on 'box_clip': no setting 'margn'"):
        build_addons({"box_clip": {"margn": 0.1}})
    model.addons.update({a.name: a for a in build_addons({"mask_zoom": {"context": 2.0}, "box_clip": {}})})
    try:
        save_checkpoint(model, tok, tmp_path / "m")
    finally:
        del model.addons["mask_zoom"], model.addons["box_clip"]
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert loaded.addon_settings() == {"mask_zoom": {"context": 2.0}, "box_clip": {"margin": 0.0}}


def test_a_predictor_changes_the_addons_of_its_checkpoint(tiny):
    from grounding import Grounder
    from grounding.errors import CheckpointError

    model, tok = tiny
    g = Grounder(model, tok, addons={"mask_zoom": {"context": 2.0}, "mask_refine": True})
    assert g.addon_settings == {"mask_zoom": {"context": 2.0}, "mask_refine": {"method": "grabcut", "interior": False}}
    assert [s.name for s in g.steps.mask_steps] == ["mask_zoom", "mask_refine"]   # in their mask order
    assert Grounder(model, tok, addons={"mask_zoom": None}).addon_settings == {}
    assert dict(model.addons) == {}   # the model itself is untouched
    # an add-on with trained weights cannot appear at inference
    with pytest.raises(CheckpointError, match="trained weights"):
        Grounder(model, tok, addons={"locator": {"kind": "fusion", "layers": 1}})


def test_the_core_finds_the_default_models_addons_without_importing_them():
    """``import grounding`` and a lookup of a built-in add-on import nothing of ``shapes``; the default model's
    add-ons are found through the ``groundseg.addons`` entry point."""
    code = ("import sys\n"
            "from grounding import Grounder\n"
            "from grounding.addons import addon_class\n"
            "addon_class('mask_zoom'); Grounder\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('shapes', 'apps', 'eval')]\n"
            "addon_class('locator')\n"
            "assert 'shapes.addons' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package,forbidden", [("segdecoder", {"grounding", "shapes", "eval", "apps"}),
                                               ("grounding", {"shapes", "eval", "apps"}),
                                               ("eval", {"shapes", "apps"})])
def test_imports_flow_one_way(package, forbidden):
    """apps -> eval -> grounding -> segdecoder; the default model's package plugs in from outside."""
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden) for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_the_locators_two_readings_in_one_pass_equal_two_passes():
    """The mirrored reading (shapes/locator_mirror.py) runs with the image's reading as one batch of 2n phrases
    (phrases of different lengths among them): the same scores and boxes as two separate passes."""
    import torch

    from shapes.locator import FusionLocator, Phrases
    from shapes.locator_mirror import combine, locate_both

    torch.manual_seed(0)
    grid, n = 4, 3
    net = FusionLocator(hidden_size=16, grid=grid, layers=2, dim=32, image_size=8).eval()
    keys, mirrored = torch.randn(grid * grid, 8), torch.randn(grid * grid, 8)
    words = torch.randn(n, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    phrases = Phrases(words, mask, mirrored=Phrases(torch.randn(n, 5, 16), mask))
    states = torch.zeros(n, 16)
    with torch.no_grad():
        one = locate_both(net, states, keys, mirrored, phrases, grid)
        two = combine(*net.locate(states, keys, phrases), *net.locate(states, mirrored, phrases.mirrored), grid)
    for a, b in zip(one, two):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
