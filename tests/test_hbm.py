"""HBM ledger: all-or-nothing charges, refusals that say what and where."""

import pytest

from actors.hbm import GiB, MiB, HBMLedger, HBMOutOfMemory, format_bytes

pytestmark = pytest.mark.fast


def test_charge_release_and_report():
    led = HBMLedger("instance0.npu0", 64 * GiB)
    led.charge("weights", "layer0.attn", 2 * GiB)
    led.charge("weights", "layer0.experts", 10 * GiB)
    led.charge("kv", "blocks", 512 * MiB)
    assert led.used == 12 * GiB + 512 * MiB
    assert led.free == led.capacity - led.used
    assert led.used_by("weights") == 12 * GiB and led.used_by("activations") == 0
    assert led.charged("kv", "blocks") == 512 * MiB and led.charged("kv", "nope") is None
    rep = led.report()
    assert rep["capacity"] == 64 * GiB and rep["used"] == led.used and rep["free"] == led.free
    assert rep["by_category"] == {"kv": 512 * MiB, "weights": 12 * GiB}

    assert led.release("weights", "layer0.attn") == 2 * GiB
    assert led.used == 10 * GiB + 512 * MiB
    assert led.release_category("weights") == 10 * GiB
    assert led.release_category("weights") == 0
    assert led.used == 512 * MiB and "weights" not in led.report()["by_category"]


def test_oversize_charge_is_refused_and_changes_nothing():
    led = HBMLedger("instance0.npu2", 64 * GiB)
    led.charge("weights", "base", 60 * GiB)
    before = led.report()
    assert not led.fits(12 * GiB) and led.fits(4 * GiB)
    with pytest.raises(HBMOutOfMemory) as err:
        led.charge("weights", "layer3.experts", 12 * GiB)
    e = err.value
    assert isinstance(e, MemoryError)
    msg = str(e)
    assert "instance0.npu2" in msg
    assert "weights" in msg and "layer3.experts" in msg
    assert "12.0 GiB" in msg and str(12 * GiB) in msg
    assert "60.0 GiB used of 64.0 GiB" in msg and "4.0 GiB free" in msg
    assert (e.npu, e.category, e.key) == ("instance0.npu2", "weights", "layer3.experts")
    assert e.requested == 12 * GiB and e.free == 4 * GiB and e.capacity == 64 * GiB
    assert led.report() == before
    assert led.charged("weights", "layer3.experts") is None
    # after a release the same charge fits
    led.release("weights", "base")
    led.charge("weights", "layer3.experts", 12 * GiB)
    assert led.used == 12 * GiB


def test_exact_fit_and_one_byte_over():
    led = HBMLedger("n", 1000)
    led.charge("kv", "a", 1000)
    assert led.free == 0
    with pytest.raises(HBMOutOfMemory):
        led.charge("kv", "b", 1)
    assert led.used == 1000


def test_double_charge_and_bad_release():
    led = HBMLedger("n", 1 * GiB)
    led.charge("kv", "blocks", 10)
    with pytest.raises(ValueError, match="already charged"):
        led.charge("kv", "blocks", 10)
    assert led.used == 10
    led.charge("weights", "blocks", 10)  # same key, other category: fine
    with pytest.raises(KeyError):
        led.release("kv", "missing")
    with pytest.raises(ValueError):
        led.charge("kv", "neg", -1)
    with pytest.raises(ValueError):
        HBMLedger("n", 0)


def test_ledgers_are_independent():
    a, b = HBMLedger("a", 100), HBMLedger("b", 100)
    a.charge("kv", "x", 60)
    assert b.used == 0
    b.charge("kv", "x", 60)
    assert a.used == b.used == 60


def test_format_bytes():
    assert format_bytes(12 * GiB) == "12.0 GiB"
    assert format_bytes(3 * MiB // 2) == "1.5 MiB"
    assert format_bytes(17) == "17 B"
