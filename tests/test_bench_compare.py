"""`omniray bench compare`: variant parsing, and two routing policies end to end."""

from __future__ import annotations

import json

import pytest

from cluster.bench.compare import parse_vary, variant_manifest
from cluster.cli import main
from cluster.config import MANIFEST_DIR, load_manifest


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


def test_compare_two_policies_in_one_invocation(ray_session, tmp_path):
    js, manifest = tmp_path / "c.json", tmp_path / "two.yaml"
    manifest.write_text(  # two instances are enough to route between, and start faster than three
        "name: two\nmodel: " + str(MANIFEST_DIR / "models" / "tiny-gqa-moge.yaml") + "\ncompute: real\n"
        "instances:\n  - {role: mixed, ep: 1}\n  - {role: mixed, ep: 1}\nengine: {kv_blocks: 128}\n")
    assert main(["bench", "compare", "--manifest", str(manifest), "--policies", "round_robin,omni",
                 "--workload", "shared-prefix",
                 "--requests", "12", "--concurrency", "4", "--output-len", "4", "--json", str(js)]) == 0
    out = json.loads(js.read_text())
    assert list(out) == ["round_robin", "omni"]
    for summary in out.values():
        assert summary["completed"] == 12 and summary["kv_hit_rate"] is not None
