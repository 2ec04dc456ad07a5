"""The per-group header cache: identical manifests are parsed once; anything else is parsed and checked."""

from __future__ import annotations

import pytest
import torch

from broadcaster.control import HeaderCache
from broadcaster.framing import make_header
from configs.wire import PROTOCOL_VERSION

SPECS = [
    ("a.weight", torch.bfloat16, (64, 32)),
    ("a.scale", torch.float32, (4,)),
    ("b.weight", torch.uint8, (300,)),
]


def test_a_repeated_manifest_is_parsed_once_and_only_the_ids_change() -> None:
    sender, receiver = HeaderCache(), HeaderCache()
    first = make_header(SPECS, sync_id="s1", weights_version=1, bucket_size=4096)
    got1 = receiver.decode(*sender.encode(first), None)
    assert got1 == first and receiver.hits == 0
    second = first.model_copy(update={"sync_id": "s2", "weights_version": 2})
    ids, manifest = sender.encode(second)
    assert sender.hits == 1 and manifest == sender.encode(first)[1]
    got2 = receiver.decode(ids, manifest, None)
    assert receiver.hits == 1
    assert got2 == second and got2.entries is got1.entries  # the parsed manifest is re-used
    assert receiver.plan(got2) is receiver.plan(got1)


def test_a_changed_manifest_is_parsed_again() -> None:
    sender, receiver = HeaderCache(), HeaderCache()
    receiver.decode(*sender.encode(make_header(SPECS, sync_id="s1", weights_version=1)), None)
    changed = make_header([*SPECS[:2], ("b.weight", torch.uint8, (301,))], sync_id="s2", weights_version=2)
    got = receiver.decode(*sender.encode(changed), None)
    assert receiver.hits == 0 and got == changed and got.entries[2].shape == (301,)


def test_layout_problems_and_protocol_mismatches_are_refusal_reasons_also_from_the_cache() -> None:
    sender, receiver = HeaderCache(), HeaderCache()
    header = make_header(SPECS, sync_id="s1", weights_version=1, bucket_size=4096)
    ids, manifest = sender.encode(header)
    for _ in range(2):  # parsed, then cached: the same refusal
        reason = receiver.decode(ids, manifest, 1024)
        assert isinstance(reason, str) and "exceeds this receiver's limit of 1024" in reason
    bad_ids = ids.replace(f'"protocol_version": {PROTOCOL_VERSION}'.encode(), b'"protocol_version": 1')
    expected = f"protocol version 1, this receiver speaks {PROTOCOL_VERSION}"
    assert receiver.decode(bad_ids, manifest, None) == expected
    assert receiver.decode(b"{not json", manifest, None).startswith("unreadable header ids")


@pytest.mark.parametrize("garbage", [b"[]", b'{"scheme": 3}'])
def test_an_unreadable_manifest_is_a_refusal_reason(garbage: bytes) -> None:
    ids, _ = HeaderCache().encode(make_header(SPECS, sync_id="s1", weights_version=1))
    assert str(HeaderCache().decode(ids, garbage, None)).startswith("unreadable header")
