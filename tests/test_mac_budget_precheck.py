"""A MAC budget is priced before calibrating, at the calls the calibration will make: the unit costs read off the
architecture equal those the statistics give afterwards, in every family, and a budget out of reach is refused
before the first prompt."""

import pytest

from slimdiff.calibrate import CalibrationConfig, calibrate, calibration_call
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, module_sites
from slimdiff.models import build_builtin
from slimdiff.prompts import read_prompts
from slimdiff.slim import SlimConfig, check_budget, mac_costs_of_call, unit_macs


@pytest.mark.parametrize("model, size", [("builtin:tiny", None), ("builtin:tiny-xl", None),
                                         ("builtin:tiny-pixart", 32), ("builtin:tiny-sd3", 32),
                                         ("builtin:tiny-flux", 32)])
def test_mac_costs_before_calibration_equal_those_of_the_statistics(model, size):
    pipe = build_builtin(model)
    config = CalibrationConfig(steps=2, pass1_prompts=1, batch_size=1, height=size, width=size)
    stats = calibrate(pipe, read_prompts(limit=2), None, config, progress=False)
    family = family_for(pipe)
    denoiser = family.denoiser(pipe)
    sites = module_sites(denoiser)
    call = calibration_call(pipe, config)
    before = mac_costs_of_call(denoiser, sites, family, *call)
    after = [(s.width, unit_macs(denoiser, s, stats)) for s in sites]
    assert before == after
    check_budget(denoiser, SlimConfig(budget=0.5, budget_unit="macs"), family, call)  # within reach: no refusal
    with pytest.raises(SlimDiffError, match="can give up with r_min=8"):
        check_budget(denoiser, SlimConfig(budget=0.999, budget_unit="macs"), family, call)


def test_mac_budget_out_of_reach_is_refused_before_calibration(tmp_path, capsys, monkeypatch):
    from slimdiff import api
    from slimdiff.cli import main

    monkeypatch.setattr(api, "collect_statistics", lambda *a, **k: pytest.fail("calibration started"))
    out = tmp_path / "slim"
    code = main(["slim", "--model", "builtin:tiny", "--budget", "0.99", "--budget-unit", "macs", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "can give up with r_min=8" in err[0] and "before calibrating" in err[0]
    assert not out.exists()
