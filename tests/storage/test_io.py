"""The IO pool's positional reads: every request lands where it was asked, and a failure is named."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fiited_store.errors import StorageError
from fiited_store.storage.io import IOPool, aligned_buffer


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, 1 << 16, dtype=np.uint8) for _ in range(3)]
    fds = []
    for i, d in enumerate(data):
        (tmp_path / f"f{i}").write_bytes(d.tobytes())
        fds.append(os.open(tmp_path / f"f{i}", os.O_RDONLY))
    yield fds, data
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("threads", [1, 4])
def test_every_request_lands_where_it_was_asked(files, threads):
    fds, data = files
    rng = np.random.default_rng(1)
    n = 200
    which = rng.integers(0, 3, n)
    lengths = rng.integers(1, 3000, n).astype(np.int64)
    offsets = rng.integers(0, (1 << 16) - 3000, n).astype(np.int64)
    dst = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = aligned_buffer(int(lengths.sum()))
    pool = IOPool(threads)
    pool.read_ranges([fds[w] for w in which], offsets, lengths, out, dst, "reading the test files")
    for i in range(n):
        want = data[which[i]][offsets[i] : offsets[i] + lengths[i]]
        np.testing.assert_array_equal(out[dst[i] : dst[i] + lengths[i]], want)
    pool.close()


def test_a_read_past_the_end_of_its_file_is_a_named_error(files):
    fds, _ = files
    out = aligned_buffer(8192)
    pool = IOPool(4)
    lengths = np.full(8, 512, np.int64)
    offsets = np.arange(8, dtype=np.int64) * 512
    offsets[5] = (1 << 16) - 100  # 100 bytes left in the file, 512 asked
    with pytest.raises(StorageError, match=r"reading the test files: .*read of 412 bytes at offset 65536 returned 0"):
        pool.read_ranges(
            [fds[0]] * 8, offsets, lengths, out, offsets * 0 + np.arange(8) * 512, "reading the test files"
        )
    pool.close()


def test_a_closed_descriptor_is_a_named_error(tmp_path):
    path = tmp_path / "gone"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    out = aligned_buffer(4096)
    with pytest.raises(StorageError, match="reading a closed file"):
        IOPool(2).read_ranges(
            [fd], np.zeros(1, np.int64), np.full(1, 4096, np.int64), out, np.zeros(1, np.int64), "reading a closed file"
        )


def test_a_buffer_too_small_for_the_requests_is_refused_before_any_read(files):
    fds, _ = files
    out = aligned_buffer(100)
    with pytest.raises(ValueError, match="outside the 100-byte buffer"):
        IOPool(2).read_ranges(
            [fds[0]], np.zeros(1, np.int64), np.full(1, 200, np.int64), out, np.zeros(1, np.int64), "x"
        )
