"""`unrollinr serve` against an independent client (ismrmrd's serializer), on loopback."""

import json
import threading

import numpy as np
import pytest
from conftest import FAST_PROPERTIES
from ismrmrd.serialization import ConfigFile, ConfigText
from peers import connect_with_retry, read_replies, send_stream
from test_gadget import check_images
from unrollinr_gadget.rawdata import RawFile, simulate_raw
from unrollinr_gadget.server import ConfigResolver, UnrollINRServer, json_parameters
from unrollinr_gadget.settings import GadgetSettings

from unrollinr.masks import random_line_mask
from unrollinr.phantoms import phantom_kspace


@pytest.fixture
def server():
    resolver = ConfigResolver(base=GadgetSettings.from_properties(FAST_PROPERTIES))
    with UnrollINRServer(("127.0.0.1", 0), resolver) as running:
        thread = threading.Thread(target=running.serve_forever, daemon=True)
        thread.start()
        yield running
        running.shutdown()


def _waveform():
    import ismrmrd

    waveform = ismrmrd.Waveform.from_array(np.arange(20, dtype=np.uint32).reshape(1, 20))
    return waveform


def test_named_config_with_json_text_and_waveforms(server, raw_phantom):
    raw = RawFile(raw_phantom)
    items = list(raw.acquisitions())
    items.insert(3, _waveform())
    parameters = json.dumps({"parameters": {"config": "unrollinr", "seed": 0, "some_scanner_key": 1}})
    with connect_with_retry(server.port) as sock:
        send_stream(sock, ConfigFile("unrollinr"), raw.header(), items, text=parameters)
        replies = read_replies(sock)
    assert replies.closed and replies.texts == []
    check_images(replies.images, raw)


def test_chain_file_name_and_config_text(server, raw_phantom):
    raw = RawFile(raw_phantom)
    chain_text = (ConfigResolver().chains_dir / "unrollinr.xml").read_text()
    chain_text = chain_text.replace('name="iterations" value="0"', 'name="iterations" value="12"')
    chain_text = chain_text.replace('value="20"', 'value="5"')
    with connect_with_retry(server.port) as sock:
        send_stream(sock, ConfigText(chain_text), raw.header(), raw.acquisitions())
        replies = read_replies(sock)
    assert replies.closed and len(replies.images) == 2
    assert "unrollinr.xml" in server.resolver.names()
    assert server.resolver.by_name("unrollinr_prospective").recon.lam_s == 2.0
    assert server.resolver.by_name("unrollinr_buffered.xml").recon.training_iterations(384) == 300


def test_failing_slices_reach_the_client_and_the_server_goes_on(server, tmp_path, raw_phantom):
    mask = random_line_mask((48, 48), 3, acs_lines=12, seed=0)
    mask[20:28] = False
    broken = RawFile(simulate_raw(phantom_kspace(48, 4), mask, tmp_path / "noacs.h5"))
    with connect_with_retry(server.port) as sock:
        send_stream(sock, ConfigFile("unrollinr"), broken.header(), broken.acquisitions())
        replies = read_replies(sock)
    assert replies.closed and replies.images == []
    assert len(replies.texts) == 1 and "centre is not sampled" in replies.texts[0]

    with connect_with_retry(server.port) as sock:
        send_stream(sock, ConfigFile("no-such-config"), broken.header(), [])
        replies = read_replies(sock)
    assert replies.closed and "unknown config 'no-such-config'" in replies.texts[0]

    raw = RawFile(raw_phantom)
    with connect_with_retry(server.port) as sock:
        send_stream(sock, ConfigFile("unrollinr"), raw.header(), raw.acquisitions())
        replies = read_replies(sock)
    assert len(replies.images) == 2


def test_two_clients_at_once(server, raw_phantom):
    raw = RawFile(raw_phantom)
    results = []

    def client():
        with connect_with_retry(server.port) as sock:
            send_stream(sock, ConfigFile("unrollinr"), raw.header(), raw.acquisitions())
            results.append(read_replies(sock))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [len(r.images) for r in results] == [2, 2]
    np.testing.assert_array_equal(results[0].images[0].data, results[1].images[0].data)


def test_json_parameters_are_validated():
    assert json_parameters('{"iterations": 5, "vendor_thing": 1}') == {"iterations": 5}
    assert json_parameters('{"dc.lam": 0.02}') == {"dc.lam": 0.02}
    with pytest.raises(ValueError, match="not JSON"):
        json_parameters("iterations=5")
    with pytest.raises(ValueError, match="JSON object"):
        json_parameters("[1, 2]")
