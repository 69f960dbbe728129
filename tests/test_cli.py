"""The `omniray` command: verify end to end, and errors that name the bad field."""

from __future__ import annotations

import pytest

from cluster.cli import main
from helpers import MODELS


def test_verify_passes_on_tiny_mla(ray_session, capsys):
    assert main(["verify", "--manifest", "tiny-mla", "--ep", "1,2", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out


def test_bad_manifest_names_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {num_experts: 8}\ninstances:\n  - role: mixed\n    ep: 0\n")
    assert main(["verify", "--manifest", str(bad)]) == 2
    assert "instances.0.ep" in capsys.readouterr().out


def test_unknown_device_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: H100\n")
    assert main(["verify", "--manifest", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "device" in out and "910C" in out


def test_bad_ep_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["verify", "--ep", "two"])
    assert info.value.code == 2
    assert "--ep" in capsys.readouterr().err


def test_mtp_without_heads_names_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {MODELS}/tiny-gqa-moge.yaml\nengine: {{mtp: true}}\n")
    assert main(["verify", "--manifest", str(bad)]) == 2
    assert "engine.mtp" in capsys.readouterr().out
