"""The `omniray` command: verify end to end, and errors that name the bad field."""

from __future__ import annotations

import pytest

from cluster.cli import main
from helpers import MODELS

pytestmark = pytest.mark.ray


def test_verify_passes_on_tiny_mla(ray_session, capsys):
    assert main(["verify", "--manifest", "tiny-mla", "--ep", "1,2", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out


def test_bad_manifest_names_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {num_experts: 8}\ninstances:\n  - role: mixed\n    ep: 0\n")
    assert main(["verify", "--manifest", str(bad)]) == 2
    assert "instances.0.ep" in capsys.readouterr().err


def test_unknown_device_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: H100\n")
    assert main(["verify", "--manifest", str(bad)]) == 2
    out = capsys.readouterr().err
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
    assert "engine.mtp" in capsys.readouterr().err


def test_serve_teardown_is_left_when_stuck_or_interrupted_again():
    """`omniray serve` after Ctrl-C: waits for a teardown that finishes; leaves one
    that hangs after its bound, or at once on a second Ctrl-C, saying which."""
    import threading
    import time

    from cluster.cli import bounded_teardown

    finished = []
    assert bounded_teardown(lambda: finished.append(1), [1], 10.0) is None and finished == [1]
    hang = threading.Event()  # a teardown stuck until the test ends
    t0 = time.monotonic()
    assert bounded_teardown(hang.wait, [1], 0.3) == "not done after 0.3 s"
    assert 0.3 <= time.monotonic() - t0 < 5
    signals = [1]
    threading.Timer(0.2, signals.append, (1,)).start()  # the second Ctrl-C
    t0 = time.monotonic()
    assert bounded_teardown(hang.wait, signals, 60.0) == "interrupted again"
    assert time.monotonic() - t0 < 30
    hang.set()
