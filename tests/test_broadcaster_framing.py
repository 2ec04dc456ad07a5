"""In-process checks of bucket planning, layout validation, dtype names and the bucket checksum."""

from __future__ import annotations

import pytest
import torch

from broadcaster.checksum import bucket_checksum
from broadcaster.framing import (
    ALIGN,
    check_layout,
    dtype_from_name,
    dtype_name,
    entry_nbytes,
    make_header,
    plan_buckets,
)
from configs.wire import WIRE_DTYPES, SyncHeader

SPECS = [
    ("small", torch.bfloat16, (3, 5)),
    ("odd", torch.uint8, (7,)),
    ("empty", torch.float32, (0, 4)),
    ("fits_whole_bucket", torch.float32, (64, 4)),  # 1024 bytes: never split, starts a new bucket
    ("huge", torch.float8_e4m3fn, (50, 61)),  # 3050 bytes > bucket: split
    ("scale", torch.float8_e8m0fnu, (3,)),
]


def test_plan_keeps_order_aligns_and_splits_only_oversized_tensors() -> None:
    sizes, entries = plan_buckets(SPECS, bucket_size=1024)
    assert [e.name for e in entries] == [s[0] for s in SPECS]
    assert all(0 < s <= 1024 and s % ALIGN == 0 for s in sizes)
    for e, (_, dtype, shape) in zip(entries, SPECS, strict=True):
        assert e.nbytes == entry_nbytes(dtype, shape)
        assert all(p.bucket_offset % ALIGN == 0 for p in e.pieces)
        assert (len(e.pieces) > 1) == (e.nbytes > 1024)
    huge = entries[4]
    assert [p.tensor_offset for p in huge.pieces] == [
        sum(q.nbytes for q in huge.pieces[:i]) for i in range(3)
    ]
    assert [p.bucket for p in huge.pieces] == [2, 3, 4] and huge.pieces[-1].nbytes == 3050 - 2048
    assert entries[3].pieces[0].bucket_offset == 0  # did not fit after "small"/"odd": new bucket
    header = make_header(SPECS, sync_id="s", weights_version=1, bucket_size=1024)
    assert check_layout(header) is None
    assert check_layout(header, max_bucket_size=512) is not None


def test_layout_check_rejects_a_tampered_header() -> None:
    header = make_header(SPECS, sync_id="s", weights_version=1, bucket_size=1024)
    bad = header.model_dump()
    bad["entries"][0]["shape"] = [3, 6]
    assert "need" in (check_layout(SyncHeader.model_validate(bad)) or "")
    bad = header.model_dump()
    bad["entries"][1]["pieces"][0]["bucket_offset"] = 1008
    assert check_layout(SyncHeader.model_validate(bad)) is not None


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple"):
        plan_buckets(SPECS, bucket_size=1000)
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([SPECS[0], SPECS[0]], bucket_size=1024)
    with pytest.raises(ValueError, match="not carried"):
        plan_buckets([("x", torch.complex64, (2,))], bucket_size=1024)
    assert plan_buckets([], bucket_size=1024) == ((), ())


def test_dtype_names_round_trip() -> None:
    for name in WIRE_DTYPES:
        assert dtype_name(dtype_from_name(name)) == name


def test_checksum_sees_a_flipped_byte_and_moved_words() -> None:
    bucket = torch.randint(
        0, 256, (4096 * 8 + 48,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    ref = bucket_checksum(bucket)
    assert torch.equal(ref, bucket_checksum(bucket.clone()))
    flipped = bucket.clone()
    flipped[12345] ^= 1
    assert not torch.equal(ref, bucket_checksum(flipped))
    words = bucket.clone().view(torch.int64)
    words[[3, 700]] = words[[700, 3]]  # same sum, different place
    assert not torch.equal(ref, bucket_checksum(words.view(torch.uint8)))
