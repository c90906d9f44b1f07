"""The .bin/.idx shards against the MMIDIDX layout, read back by a reader written here from the spec."""

import struct

import numpy as np
import pytest

from slm.errors import SlmError
from slm.formats.indexed import IndexedDataset, IndexedWriter


def read_by_spec(prefix):
    """An independent reader: Megatron-LM's indexed_dataset layout, byte by byte."""
    idx = open(f"{prefix}.idx", "rb").read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack_from("<Q", idx, 9)
    code, = struct.unpack_from("<B", idx, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", idx, 18)
    dtype = {4: np.int32, 8: np.uint16}[code]
    o = 34
    lengths = struct.unpack_from(f"<{n_seq}i", idx, o)
    o += 4 * n_seq
    pointers = struct.unpack_from(f"<{n_seq}q", idx, o)
    o += 8 * n_seq
    doc_idx = struct.unpack_from(f"<{n_doc}q", idx, o)
    assert o + 8 * n_doc == len(idx)
    data = open(f"{prefix}.bin", "rb").read()
    size = np.dtype(dtype).itemsize
    docs = [np.frombuffer(data[p:p + n * size], dtype=dtype).tolist() for p, n in zip(pointers, lengths)]
    return version, code, docs, list(doc_idx)


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_round_trip_against_the_spec(tmp_path, dtype, code):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n).astype(dtype) for n in (5, 1, 300, 17, 2)]
    w = IndexedWriter(tmp_path / "shard", dtype)
    w.add(docs[0])
    w.add_batch(np.concatenate(docs[1:4]), np.array([1, 300, 17]))
    w.add(docs[4])
    assert not (tmp_path / "shard.bin").exists()  # only temp names until close()
    w.close()
    version, got_code, got, doc_idx = read_by_spec(tmp_path / "shard")
    assert (version, got_code) == (1, code)
    assert got == [d.tolist() for d in docs]
    assert doc_idx == [0, 1, 2, 3, 4, 5]
    ds = IndexedDataset(tmp_path / "shard")
    assert len(ds) == 5 and ds.n_tokens == sum(d.size for d in docs) and ds.dtype == np.dtype(dtype)
    assert [ds[i].tolist() for i in range(5)] == [d.tolist() for d in docs]
    assert ds.document_starts(0, 400).tolist() == [0, 5, 6, 306, 323]
    assert ds.document_starts(6, 306).tolist() == [6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin", "shard.idx"]


def test_writer_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(IndexedWriter, "CHUNK", 3)  # exercise the chunked index writing
    w = IndexedWriter(tmp_path / "s", np.uint16)
    for n in range(1, 11):
        w.add(np.full(n, n, dtype=np.uint16))
    w.close()
    _, _, docs, doc_idx = read_by_spec(tmp_path / "s")
    assert docs == [[n] * n for n in range(1, 11)] and doc_idx == list(range(11))


def test_abort_leaves_nothing(tmp_path):
    w = IndexedWriter(tmp_path / "s", np.uint16)
    w.add(np.arange(10, dtype=np.uint16))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_shards_are_refused(tmp_path):
    w = IndexedWriter(tmp_path / "s", np.uint16)
    w.add(np.arange(10, dtype=np.uint16))
    w.close()
    with open(tmp_path / "s.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(SlmError, match="the index says 20"):
        IndexedDataset(tmp_path / "s")
    (tmp_path / "s.idx").write_bytes(b"NOTANIDX" + b"\x00" * 40)
    with pytest.raises(SlmError, match="not an MMIDIDX index"):
        IndexedDataset(tmp_path / "s")
