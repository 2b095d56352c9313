"""The manifest's file table with a SHA-256 per block for large files (checked in parallel at load; a
16.9 GB weights file is about 10 s of SHA-256 in one stream): the digests are those of the bytes, a
changed byte is found in its block, a table whose blocks do not cover the file is refused, and small
files keep the table as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from llada_export.contract.manifest import MANIFEST, Manifest, ManifestError, file_table

BLOCK = 1000  # bytes: small blocks stand in for the 256 MiB of a real table


@pytest.fixture
def data(tmp_path):
    big = bytes(range(256)) * 19 + b"tail"  # 4868 bytes: four full blocks and a short fifth
    (tmp_path / "weights.safetensors").write_bytes(big)
    (tmp_path / "small.bin").write_bytes(b"x" * (2 * BLOCK - 1))  # under two blocks: the whole file only
    return tmp_path, big


def test_block_digests_are_those_of_the_bytes(data):
    root, big = data
    table = file_table(root, [root / "weights.safetensors", root / "small.bin"], block_bytes=BLOCK)
    entry = table["weights.safetensors"]
    assert entry.sha256 == hashlib.sha256(big).hexdigest() and entry.bytes == len(big)
    assert entry.block_bytes == BLOCK
    assert list(entry.blocks) == [hashlib.sha256(big[i:i + BLOCK]).hexdigest() for i in (0, 1000, 2000, 3000, 4000)]
    small = table["small.bin"]
    assert small.blocks == () and small.to_dict() == {"sha256": hashlib.sha256(b"x" * 1999).hexdigest(), "bytes": 1999}


def _manifest(engines, root):
    m = Manifest.read(engines, verify=False)
    files = file_table(root, [root / "weights.safetensors", root / "small.bin"], block_bytes=BLOCK)
    return dataclasses.replace(m, files=files)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_changed_byte_is_found_in_its_block(engines, data, deferred):
    root, big = data
    m = _manifest(engines, root)
    defer = ["weights.safetensors"] if deferred else []
    m.verify(root, defer=defer).wait()  # the pristine bytes pass
    changed = bytearray(big)
    changed[3500] ^= 0x01  # in the fourth block
    (root / "weights.safetensors").write_bytes(bytes(changed))
    with pytest.raises(ManifestError, match=r"weights.safetensors does not match its SHA-256 in the manifest "
                                            r"\(block 4 of 5\) \(altered\?\)"):
        m.verify(root, defer=defer).wait()


def test_blocks_that_do_not_cover_the_file_are_refused(engines, tmp_path):
    dst = tmp_path / "e"
    dst.mkdir()
    d = json.loads((engines / MANIFEST).read_text())
    rel = next(iter(d["files"]))
    # 7 MiB of blocks for a small file (the file table is not sealed: no digest to redo)
    d["files"][rel] |= {"block_bytes": 1 << 20, "block_sha256": ["0" * 64] * 7}
    (dst / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="7 block digests of 1048576 bytes for a file of"):
        Manifest.read(dst, verify=False)


def test_a_table_round_trips(engines, data):
    root, _ = data
    m = Manifest.read(engines, verify=False)
    m = dataclasses.replace(m, files=m.files | _manifest(engines, root).files)  # the graphs' files must stay listed
    back = Manifest.from_dict(m.sealed_dict())
    assert back.files == m.files and back.files["weights.safetensors"].blocks
