"""The published Ascend figures: the cost model's figures pinned, the catalog's
calibration reproduced by the fit, and the engine agreeing with the analytic price."""

import pytest

from actors.devices import get_device
from cluster.bench.paper import FITTED, ROWS, fit, price, results, run_row
from cluster.config import load_manifest

pytestmark = pytest.mark.serving

#: the emulated figure of every row (tokens/s per device), as the cost model gives it now:
#: a change to the model or the catalog shows up here (update after a deliberate change)
PINNED = {
    "pangu-800i-a2 prefill": 4830,
    "pangu-800i-a2 decode": 1148,
    "pangu-800i-a2 decode MTP": 1808,
    "pangu-300i-duo prefill": 1054,
    "pangu-300i-duo decode": 201,
    "pangu-300i-duo decode MTP": 438,
    "cloudmatrix prefill": 6689,
    "cloudmatrix decode": 1943,
    "cloudmatrix 1K/1K b128": 3309,
    "cloudmatrix 2K/256 b112": 2807,
    "cloudmatrix 4K/256 b24": 974,
    "cloudmatrix TPOT 15 ms b8": 414,
}


def test_every_row_has_a_manifest_of_its_own_configuration_and_a_pinned_figure():
    assert {r.name for r in ROWS} == set(PINNED)
    for row in ROWS:
        m = load_manifest(row.manifest)
        assert m.compute == "emulated" and len(m.instances) == 1, row.name
        assert row.role in ("calibration", "held_out") and row.config and row.source
    assert {r.role for r in ROWS} == {"calibration", "held_out"}


def test_emulated_figures_are_pinned():
    got = {r.name: r.emulated for r in results()}
    for name, want in PINNED.items():
        assert got[name] == pytest.approx(want, rel=2e-3), name


def test_calibration_figures_are_within_ten_percent():
    for r in results():
        if r.role == "calibration":
            assert abs(r.ratio - 1) <= 0.10, (r.name, r.ratio)


@pytest.mark.parametrize("device", ["910B", "300I Duo", "910C"])
def test_the_catalog_calibration_is_what_the_fit_gives_on_the_calibration_figures(device):
    stored = get_device(device).calibration
    fitted = fit(device)
    assert fitted.fitted == stored.fitted and set(fitted.fitted) <= set(FITTED)
    assert fitted.fitted_on == stored.fitted_on
    assert all(r.role == "calibration" for r in ROWS if r.name in stored.fitted_on)
    for name in fitted.fitted:
        assert getattr(fitted, name) == pytest.approx(getattr(stored, name), rel=0.01), name


def test_mtp_rows_make_more_than_one_token_per_step_and_report_tpot_per_token():
    row = next(r for r in ROWS if r.name == "cloudmatrix decode")
    tok_s, tpot = price(row)
    assert tpot < 0.050  # the paper's TPOT bound
    assert tok_s == pytest.approx(row.batch * 1.7 / (tpot * 1.7))


@pytest.mark.parametrize("name", ["pangu-800i-a2 prefill", "cloudmatrix decode"])
def test_the_engine_gives_the_analytic_figure(ray_session, name):
    """Through the engine (the whole batch admitted before the first step, the window
    taken while it all decodes, MTP drafts drawn at the manifest's acceptance rate,
    4 actors standing for 320 dies) the figure is the analytic one."""
    row = next(r for r in ROWS if r.name == name)
    ran = run_row(row)
    analytic, tpot = price(row)
    tolerance = 2e-3 if row.phase == "prefill" else 0.05  # drafts accepted by a seeded draw, contexts grow
    assert ran.emulated == pytest.approx(analytic, rel=tolerance)
    if tpot is not None:
        assert ran.tpot_ms == pytest.approx(tpot * 1000, rel=tolerance)


def test_through_the_proxy_the_master_places_the_batch_and_the_figures_hold(ray_session):
    """`--through-proxy`: the manifest served whole, the batch sent over HTTP. One
    mixed instance: the master's path changes where a request runs, not what a step
    costs, so the figures are the engine's alone. Prefill + decode instances: the
    decode instance holds until every request's KV reached it, so its window is the
    whole batch; prefill is priced as on the engine alone, and the first decode step
    pays the KV hand-off."""
    from cluster.bench.simulate import run_simulation
    from cluster.config import InstanceSpec

    pd = load_manifest("pd-72b")
    mixed = pd.model_copy(update={"instances": [InstanceSpec(name="m0", role="mixed", ep=2)]})
    alone = run_simulation(mixed, 8, 256, 6)
    served = run_simulation(mixed, 8, 256, 6, through_proxy=True)
    assert served.through_proxy and served.instances == 1 and served.ep == 2
    for key in ("prefill_tok_s_per_npu", "decode_tok_s_per_npu", "tpot_s", "decode_steps"):
        assert getattr(served, key) == pytest.approx(getattr(alone, key), rel=1e-9), key
    split = pd.model_copy(update={"instances": [InstanceSpec(name="p0", role="prefill", ep=2),
                                                InstanceSpec(name="d0", role="decode", ep=2)]})
    disaggregated = run_simulation(split, 8, 256, 6, through_proxy=True)
    assert disaggregated.instances == 2 and disaggregated.ep == 4
    assert disaggregated.prefill_tok_s_per_npu == pytest.approx(alone.prefill_tok_s_per_npu, rel=1e-9)
    assert disaggregated.decode_steps == alone.decode_steps  # the whole batch decoded together on d0
    assert disaggregated.decode_device_s > alone.decode_device_s  # the hand-off's KV load
