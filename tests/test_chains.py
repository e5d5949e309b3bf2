"""Every chain parses and names modules and targets that import and exist."""

import importlib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from unrollinr_gadget.settings import GadgetSettings, chain_properties, gadget_configuration

CHAINS = sorted((Path(__file__).resolve().parents[1] / "chains").glob("*.xml"))


def test_there_are_four_chains():
    names = {p.name for p in CHAINS}
    assert {"unrollinr.xml", "unrollinr_prospective_connect.xml", "unrollinr_buffered.xml",
            "unrollinr_distributed.xml"} <= names


@pytest.mark.parametrize("chain", CHAINS, ids=lambda p: p.name)
def test_chain_is_valid(chain):
    root = ElementTree.parse(chain).getroot()
    assert root.tag == "configuration" and root.findtext("version") == "2"
    external = root.find("stream/external")
    if external is None:  # the distributed chain: our gadget runs inside the worker stream
        external = root.find("stream/distributed/stream/external")
    assert external is not None
    execute, connect = external.find("execute"), external.find("connect")
    assert (execute is None) != (connect is None)
    if execute is not None:
        assert execute.get("type") == "python"
        module = importlib.import_module(execute.get("name"))
        assert callable(getattr(module, execute.get("target")))
    else:
        assert int(connect.get("port")) > 0
    settings = GadgetSettings.from_properties(chain_properties(gadget_configuration(root)))
    assert settings.recon.training_iterations(256) > 0
    for gadget in root.findall("stream/gadget"):
        assert gadget.findtext("dll") and gadget.findtext("classname")


def test_buffered_chain_runs_buffering_before_our_gadget():
    root = ElementTree.parse(next(p for p in CHAINS if p.name == "unrollinr_buffered.xml")).getroot()
    steps = [child.findtext("classname") or child.tag for child in root.find("stream")]
    assert steps.index("AcquisitionAccumulateTriggerGadget") < steps.index("BucketToBufferGadget") < steps.index(
        "external")


def test_distributed_chain_splits_by_slice_and_connects_to_the_workers_listener():
    root = ElementTree.parse(next(p for p in CHAINS if p.name == "unrollinr_distributed.xml")).getroot()
    distributed = root.find("stream/distributed")
    distributor = distributed.find("distributor")
    assert distributor.findtext("classname") == "AcquisitionDistributor"
    assert distributor.find("property[@name='parallel_dimension']").get("value") == "slice"
    assert distributed.find("stream/external/execute") is None  # Gadgetron drops its target on the way
    readers = {r.findtext("classname") for r in distributed.findall("readers/reader")}
    writers = {w.findtext("classname") for w in distributed.findall("writers/writer")}
    assert readers == {"AcquisitionReader", "ImageReader"} and writers == {"AcquisitionWriter", "ImageWriter"}


@pytest.mark.parametrize(("value", "expected"), [("2000", 2000.0), ("1.5e3", 1500.0), ("auto", None), ("", None)])
def test_the_uint16_scale_is_a_gadget_setting(value, expected):
    assert GadgetSettings.from_properties({"uint16_scale": value, "iterations": "5"}).uint16_scale == expected


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "bright"])
def test_a_uint16_scale_that_is_not_a_positive_number_is_refused_by_name(value):
    with pytest.raises(ValueError, match="uint16_scale"):
        GadgetSettings.from_properties({"uint16_scale": value})
