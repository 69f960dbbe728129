"""`omniray bench engine` on a tiny setting: it times the right tokens, prefix
reuse really hits the cache, and the JSON summary has the documented keys."""

from __future__ import annotations

import json

import pytest

from helpers import MODELS

from cluster.bench.engine import run_engine_bench
from cluster.cli import main
from cluster.config import load_manifest

pytestmark = pytest.mark.ray


def test_bench_engine_tiny(ray_session, tmp_path):
    result = run_engine_bench(load_manifest("local"), ep=2, batches=[1, 4], prompt_len=32, output_len=4,
                              prefix_len=32, suffix_len=16, repeats=1, compare_overlap=True)
    assert result.tokens_match is True
    assert [b.batch for b in result.batches] == [1, 4]
    assert all(b.tokens_match is True for b in result.batches)
    assert result.prefix.cached_tokens > 0 and result.prefix.tokens_match is True

    path = tmp_path / "bench.json"
    result.write_json(str(path))
    data = json.loads(path.read_text())
    assert data["model"] == "tiny-gqa-moge" and data["ep"] == 2 and data["dtype"] == "float64"
    for row in data["batches"]:
        assert set(row) == {"batch", "engine_tok_s", "reference_tok_s", "ratio", "tokens_match", "no_overlap_tok_s",
                            "overlap_gain"}
        assert row["tokens_match"] is True  # both engines' tokens, overlapped steps or not
        assert all(row[k] > 0 for k in ("batch", "engine_tok_s", "reference_tok_s", "ratio", "no_overlap_tok_s"))
        assert row["overlap_gain"] == row["engine_tok_s"] / row["no_overlap_tok_s"]
    # where a step goes: every step of the timed run counted once, each part measured, EP-2 exchanges tokens
    for sp in data["splits"]:
        assert 4 <= sp["steps"] <= 4 + sp["batch"]  # 4 tokens each: a step each, prefills joined or not
        assert all(sp[k] > 0 for k in ("step_ms", "dispatch_ms", "npu_compute_ms", "all_to_all_ms", "update_ms"))
        # the loop's time per step is its wait for results and its host work (with overlapped
        # steps the wait can be shorter than the NPUs' time: "results back" goes negative)
        assert sp["step_ms"] == pytest.approx(sp["npu_compute_ms"] + sp["all_to_all_ms"] + sp["transfer_ms"]
                                              + sp["dispatch_ms"] + sp["update_ms"] + sp["other_ms"])
        assert sp["npu_compute_ms"] + sp["all_to_all_ms"] < sp["step_ms"]  # the NPUs' part of each step
    prefix = data["prefix"]
    assert {"ttft_uncached_s", "ttft_cached_s", "ratio", "cached_tokens"} <= set(prefix)
    assert all(prefix[k] > 0 for k in ("ttft_uncached_s", "ttft_cached_s", "ratio", "cached_tokens"))


def test_bench_engine_refuses_emulated_compute(ray_session, tmp_path, capsys):
    manifest = tmp_path / "emu.yaml"  # emulated tokens are stand-ins: nothing to check against the reference
    manifest.write_text(f"model: {MODELS}/tiny-gqa-moge.yaml\ncompute: emulated\n")
    assert main(["bench", "engine", "--manifest", str(manifest)]) == 2
    assert "compute" in capsys.readouterr().err


def test_bench_engine_reports_a_token_mismatch(ray_session, monkeypatch):
    import cluster.bench.engine as bench
    from actors.model.reference import generate

    def wrong(model, prompts, n):  # a reference that disagrees with the engine on every last token
        out = generate(model, prompts, n)
        out.tokens = [t[:-1] + [(t[-1] + 1) % 512] for t in out.tokens]
        return out

    monkeypatch.setattr(bench, "generate", wrong)
    result = bench.run_engine_bench(load_manifest("local"), ep=1, batches=[2], prompt_len=8, output_len=2,
                                    prefix_len=32, suffix_len=8, repeats=1)
    assert result.tokens_match is False
    assert result.batches[0].tokens_match is False and result.prefix.tokens_match is False
