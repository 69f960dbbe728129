"""Device catalog: lookups by loose names, figures that match their sources."""

import dataclasses

import pytest

from actors.devices import GiB, DeviceSpec, device_names, get_device, get_node, node_names

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("910B", "910B"),
        ("910b", "910B"),
        ("Ascend 910B", "910B"),
        ("910c", "910C"),
        (" 910C ", "910C"),
        ("300I Duo", "300I Duo"),
        ("300i-duo", "300I Duo"),
        ("300iduo", "300I Duo"),
        ("Atlas 300I_Duo", "300I Duo"),
    ],
)
def test_get_device_accepts_loose_names(name, canonical):
    assert get_device(name).name == canonical


def test_known_figures():
    b, c, duo = get_device("910B"), get_device("910C"), get_device("300I Duo")
    assert b.hbm_bytes == 64 * GiB
    assert c.hbm_bytes == 128 * GiB
    assert c.interconnect == "UB" and b.interconnect == "HCCS"
    assert duo.hbm_bandwidth == pytest.approx(408e9)
    assert duo.int8_tops == pytest.approx(280) and duo.fp16_tflops == pytest.approx(140)
    # the 910C is two 910B-class dies: more of everything
    assert c.fp16_tflops > b.fp16_tflops and c.hbm_bandwidth > b.hbm_bandwidth


@pytest.mark.parametrize("name", ["910B", "910C", "300I Duo"])
def test_every_device_is_sourced_and_sane(name):
    d = get_device(name)
    assert d.sources and all(isinstance(s, str) and s for s in d.sources)
    assert d.int8_tops >= d.fp16_tflops > 0
    assert d.hbm_bytes > 0 and d.hbm_bandwidth > 0
    assert d.interconnect_bandwidth >= d.inter_node_bandwidth > 0


def test_unknown_device_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_device("H100")
    msg = str(err.value)
    assert "H100" in msg
    for name in device_names():
        assert name in msg


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_device("910B").hbm_bytes = 1  # type: ignore[misc]
    assert isinstance(get_device("910B"), DeviceSpec)


def test_nodes():
    a2 = get_node("800i-a2")
    assert a2.name == "800I A2" and a2.devices_per_node == 8 and a2.device is get_device("910B")
    cm = get_node("cloudmatrix 384")
    assert cm.devices_per_node == 384 and cm.device.name == "910C"
    assert set(node_names()) == {"800I A2", "CloudMatrix384"}
    with pytest.raises(ValueError, match="800I A2"):
        get_node("DGX")
