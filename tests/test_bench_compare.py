"""`omniray bench compare`: variant parsing (--vary, --variants), and two variants
end to end on one clock."""

from __future__ import annotations

import json

import pytest

from cluster.bench.compare import parse_vary, parse_variants, variant_manifest
from cluster.cli import main
from cluster.config import MANIFEST_DIR, load_manifest

pytestmark = pytest.mark.serving


def test_parse_vary_names_variants_and_rejects_unknown_settings():
    assert [v.name for v in parse_vary("policy=omni,round_robin")] == ["omni", "round_robin"]
    assert [v.name for v in parse_vary("pd_mode=sequential,parallel")] == ["pd_mode=sequential", "pd_mode=parallel"]
    with pytest.raises(ValueError, match="not a proxy setting"):
        parse_vary("frobnicate=1,2")
    with pytest.raises(ValueError, match="KEY=V1"):
        parse_vary("policy")


def test_variant_manifest_validates_the_value():
    m = load_manifest("local")
    (off,) = parse_vary("weighted_sorting=false")
    assert variant_manifest(m, off).proxy.weighted_sorting is False and m.proxy.weighted_sorting is True
    (bad,) = parse_vary("policy=fastest")
    with pytest.raises(ValueError, match=r"^--vary policy=fastest: policy: Input should be 'round_robin'"):
        variant_manifest(m, bad)


def test_compare_names_a_bad_value_before_it_runs_any_variant(capsys):
    assert main(["bench", "compare", "--policies", "omni,fastest", "--requests", "2"]) == 2
    assert "--vary policy=fastest: policy:" in capsys.readouterr().err


def test_parse_variants_names_each_by_its_spec():
    variants = parse_variants("routing-72b; pd-72b:pd_mode=sequential ;pd-72b:pd_mode=parallel:weighted_sorting=false")
    assert [v.name for v in variants] == ["routing-72b", "pd-72b:pd_mode=sequential",
                                          "pd-72b:pd_mode=parallel:weighted_sorting=false"]
    assert [v.manifest for v in variants] == ["routing-72b", "pd-72b", "pd-72b"]
    assert variants[2].settings == (("pd_mode", "parallel"), ("weighted_sorting", "false"))
    assert variants[0].settings == ()


@pytest.mark.parametrize(("text", "match"), [
    ("routing-72b;;pd-72b", r"^--variants: expected MANIFEST\[:KEY=VALUE...\]\[;...\], got an empty variant"),
    ("", "empty variant"),
    ("pd-72b:pd_mode", r"^--variants pd-72b:pd_mode: expected KEY=VALUE, got 'pd_mode'"),
    ("pd-72b:=parallel", r"^--variants pd-72b:=parallel: expected KEY=VALUE, got '=parallel'"),
    ("local;pd-72b:frob=1", r"^--variants pd-72b:frob=1: 'frob' is not a proxy setting"),
    (":policy=omni", r"^--variants :policy=omni: no manifest before ':'"),
    ("local;local", "given twice"),
])
def test_parse_variants_names_the_bad_part(text, match):
    with pytest.raises(ValueError, match=match):
        parse_variants(text)


def test_a_variant_manifest_or_value_that_does_not_load_is_named():
    base = load_manifest("local")
    (missing,) = parse_variants("nope:policy=omni")
    with pytest.raises(ValueError, match=r"^--variants nope:policy=omni: nope: no such manifest"):
        variant_manifest(base, missing)
    (bad,) = parse_variants("local-routing:pd_mode=sideways")
    with pytest.raises(ValueError, match=r"^--variants local-routing:pd_mode=sideways: pd_mode: Input should be"):
        variant_manifest(base, bad)
    (ok,) = parse_variants("local-routing:policy=round_robin")
    assert variant_manifest(base, ok).name == "local-routing"


def test_compare_refuses_vary_and_variants_together(capsys):
    assert main(["bench", "compare", "--vary", "policy=omni", "--variants", "local", "--requests", "2"]) == 2
    assert "--variants and --vary" in capsys.readouterr().err


def test_compare_variants_in_one_invocation_on_one_clock(ray_session, tmp_path):
    """Two variants of one emulated manifest (two instances are enough to route between,
    and start faster than three): summaries in device seconds under --time-scale,
    with goodput, the ideal hit rate and what each variant changed."""
    js, manifest = tmp_path / "c.json", tmp_path / "two.yaml"
    manifest.write_text(
        "name: two\nmodel: " + str(MANIFEST_DIR / "models" / "tiny-gqa-moge.yaml") + "\ncompute: emulated\n"
        "instances:\n  - {role: mixed, ep: 1}\n  - {role: mixed, ep: 1}\nengine: {kv_blocks: 128}\n")
    variants = f"{manifest}:policy=round_robin;{manifest}:policy=omni:weighted_sorting=false"
    assert main(["bench", "compare", "--variants", variants, "--workload", "shared-prefix", "--time-scale", "2",
                 "--requests", "12", "--concurrency", "4", "--output-len", "4", "--slo-ttft-ms", "60000",
                 "--json", str(js)]) == 0
    out = json.loads(js.read_text())
    assert list(out) == variants.split(";")
    for summary in out.values():
        assert summary["completed"] == 12 and summary["kv_hit_rate"] is not None
        assert summary["manifest"] == "two"
        assert summary["time_scale"] == 2.0 and summary["latency_unit"] == "device_s"
        assert summary["slo_attainment"] == 1.0 and summary["goodput_req_per_s"] > 0
        assert 0 < summary["ideal_kv_hit_rate"] < 1
        ideal = summary["ideal_kv_hit_rate"]
        assert summary["kv_hit_fraction_of_ideal"] == pytest.approx(summary["kv_hit_rate"] / ideal)
        assert "emulation_overrun_fraction" in summary and "max_queue_wait_s" in summary
    first, second = out.values()
    assert first["settings"] == {"policy": "round_robin"}
    assert second["settings"] == {"policy": "omni", "weighted_sorting": False}
