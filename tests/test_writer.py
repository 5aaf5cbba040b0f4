"""The streaming sharded safetensors writer, shard planning, size parsing and atomic output directories."""

from __future__ import annotations

import json
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergequant.cli import app
from mergequant.errors import MergeQuantError
from mergequant.io.output_dir import atomic_output_dir
from mergequant.io.writer import INDEX_FILE, PlannedTensor, ShardedWriter, plan_shards
from mergequant.units import parse_size


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.f32": torch.randn(33, 17, generator=g),
        "b.bf16": torch.randn(64, 8, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(5, 3, 7, generator=g).to(torch.float16),
        "d.i64": torch.randint(-(2**40), 2**40, (11,), generator=g),
        "e.u8": torch.randint(0, 255, (13,), generator=g).to(torch.uint8),
        "f.bool": torch.rand(9, generator=g) > 0.5,
        "g.scalar": torch.tensor(3.25),
        "h.f8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "i.f64": torch.randn(4, 4, generator=g, dtype=torch.float64),
        "j.i8": torch.randint(-128, 127, (7, 3), generator=g).to(torch.int8),
    }


def planned(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def write_all(directory: Path, tensors: dict[str, torch.Tensor], max_bytes: int, items=None, workers: int = 1,
              writeback_every: int | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(planned(tensors), max_bytes)
    w = ShardedWriter(directory, shards, writeback_every=writeback_every)
    items = items if items is not None else [(n, t, 0) for n, t in tensors.items()]
    if workers == 1:
        for n, chunk, off in items:
            w.write(n, chunk, off)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda it: w.write(*it), items))
    index = w.finish(fsync=writeback_every is not None)
    return shards, index


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, works for float8 and bool)."""
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                     y.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------------------
# files load back with the reference safetensors implementation
# ---------------------------------------------------------------------------------------------------
def test_single_file_loads_with_safetensors(tmp_path):
    tensors = sample_tensors()
    shards, index = write_all(tmp_path, tensors, 10**9)
    assert [s.file for s in shards] == ["model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert same(loaded[n], t), n
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # the header is padded so that data starts 8-byte aligned, and the file has no trailing bytes
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    assert len(raw) == 8 + n + sum(t.numel() * t.element_size() for t in tensors.values())


def test_matches_reference_writer_bytes_of_data(tmp_path):
    """Our file and safetensors' own file hold the same bytes for every tensor."""
    tensors = sample_tensors(1)
    write_all(tmp_path / "ours", tensors, 10**9)
    save_file(tensors, tmp_path / "ref.safetensors")
    ours, ref = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert set(ours) == set(ref)
    for n in ref:
        assert same(ours[n], ref[n]), n


def test_sharded_files_load_and_index(tmp_path):
    tensors = sample_tensors(2)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    shards, index = write_all(tmp_path, tensors, 600)
    assert len(shards) > 2
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    on_disk = json.loads((tmp_path / INDEX_FILE).read_text())
    assert on_disk == json.loads(json.dumps(index))
    assert on_disk["metadata"]["total_size"] == sum(sizes.values())
    assert set(on_disk["weight_map"]) == set(tensors)
    seen = {}
    for f in files:
        for n, t in load_file(tmp_path / f).items():
            assert on_disk["weight_map"][n] == f
            seen[n] = t
    assert set(seen) == set(tensors)
    for n, t in tensors.items():
        assert same(seen[n], t), n


# ---------------------------------------------------------------------------------------------------
# chunked, concurrent, out-of-order writes
# ---------------------------------------------------------------------------------------------------
def _chunks(tensors, rng: random.Random):
    items = []
    for n, t in tensors.items():
        flat = t.reshape(-1)
        off = 0
        while off < flat.numel():
            k = rng.randint(1, max(1, flat.numel() // 3))
            items.append((n, flat[off:off + k].clone(), off))
            off += k
        if flat.numel() == 0:
            items.append((n, flat, 0))
    rng.shuffle(items)
    return items


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_threaded_random_order_same_bytes(tmp_path, seed):
    tensors = sample_tensors(seed)
    tensors["big"] = torch.randn(20000, generator=torch.Generator().manual_seed(seed))
    write_all(tmp_path / "seq", tensors, 5000)
    rng = random.Random(seed)
    items = _chunks(tensors, rng)
    assert len(items) > 3 * len(tensors)
    write_all(tmp_path / "par", tensors, 5000, items=items, workers=8)
    seq, par = sorted((tmp_path / "seq").iterdir()), sorted((tmp_path / "par").iterdir())
    assert [p.name for p in seq] == [p.name for p in par] and len(seq) > 2
    for a, b in zip(seq, par):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_background_writeback_same_bytes(tmp_path, monkeypatch):
    """With writeback on (a sync every 1000 bytes), the syncs really happen and the files are unchanged."""
    import os

    from mergequant.io import writer as writer_mod

    synced = []
    real = os.fdatasync
    monkeypatch.setattr(writer_mod.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    tensors = sample_tensors(3)
    tensors["big"] = torch.randn(20000, generator=torch.Generator().manual_seed(3))
    write_all(tmp_path / "plain", tensors, 5000)
    items = _chunks(tensors, random.Random(3))
    write_all(tmp_path / "wb", tensors, 5000, items=items, workers=4, writeback_every=1000)
    # at least one background sync happened (without writeback there are none); how many depends on the
    # scheduler: a request made while the previous sync is still pending is folded into it
    assert len(synced) >= 1
    for a, b in zip(sorted((tmp_path / "plain").iterdir()), sorted((tmp_path / "wb").iterdir())):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_write_guards(tmp_path):
    t = {"x": torch.zeros(10), "y": torch.zeros(4, dtype=torch.float16)}
    w = ShardedWriter(tmp_path, plan_shards(planned(t), 10**6))
    with pytest.raises(TypeError):
        w.write("x", torch.zeros(10, dtype=torch.float16))
    with pytest.raises(ValueError):
        w.write("x", torch.zeros(4), 8)  # elements 8..11 of a 10-element tensor
    w.write("x", torch.zeros(10))
    w.write("y", torch.zeros(2, dtype=torch.float16), 0)  # only half of y
    with pytest.raises(RuntimeError, match="y"):
        w.finish(fsync=False)
    w.close()


# ---------------------------------------------------------------------------------------------------
# shard planning
# ---------------------------------------------------------------------------------------------------
def _pt(name, numel, dtype=torch.float32):
    return PlannedTensor(name, dtype, (numel,))


def test_plan_shards_groups_by_hand():
    ts = [_pt("t0", 10), _pt("t1", 10), _pt("t2", 10), _pt("t3", 50), _pt("t4", 5), _pt("t5", 5)]
    # bytes 40 40 40 200 20 20 with max 100: [t0 t1] [t2] [t3 alone, > max] [t4 t5]
    shards = plan_shards(ts, 100)
    assert [[t.name for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [s.file for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [s.data_bytes for s in shards] == [80, 40, 200, 40]
    for s in shards:
        assert s.data_bytes <= 100 or len(s.tensors) == 1


def test_plan_shards_exact_fit_and_single():
    ts = [_pt("a", 25), _pt("b", 25), _pt("c", 1)]
    assert [[t.name for t in s.tensors] for s in plan_shards(ts, 100)] == [["a"], ["b"], ["c"]]
    assert [[t.name for t in s.tensors] for s in plan_shards(ts, 200)] == [["a", "b"], ["c"]]
    one = plan_shards(ts, 10**9)
    assert len(one) == 1 and one[0].file == "model.safetensors" and [t.name for t in one[0].tensors] == ["a", "b", "c"]
    big_first = plan_shards([_pt("huge", 1000), _pt("small", 1)], 100)
    assert [[t.name for t in s.tensors] for s in big_first] == [["huge"], ["small"]]


def test_plan_shards_header_offsets_consistent():
    ts = [_pt("a", 3, torch.bfloat16), _pt("b", 5), _pt("c", 2, torch.float64)]
    (shard,) = plan_shards(ts, 10**6)
    (n,) = struct.unpack("<Q", shard.header[:8])
    header = json.loads(shard.header[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}
    assert header["b"] == {"dtype": "F32", "shape": [5], "data_offsets": [6, 26]}
    assert header["c"] == {"dtype": "F64", "shape": [2], "data_offsets": [26, 42]}
    assert shard.offsets == {"a": 8 + n, "b": 8 + n + 6, "c": 8 + n + 26}
    assert shard.file_size == 8 + n + 42


# ---------------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("5GB", 5 * 10**9), ("1GiB", 2**30), ("512MiB", 512 * 2**20),
    ("1.5GB", 1_500_000_000), (" 5gb ", 5 * 10**9), ("1000", 1000), ("10k", 10_000), (1234, 1234),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "5XB", "-1GB", "0", "0MB", "", "GB", "1.2.3GB"])
def test_parse_size_rejects(text):
    with pytest.raises(MergeQuantError):
        parse_size(text)


def test_bad_shard_size_on_cli(tmp_path):
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--shard-size", "5XB"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: ") and "5XB" in res.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# atomic output directories
# ---------------------------------------------------------------------------------------------------
def _siblings(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_removed_on_exception(tmp_path, exc):
    out = tmp_path / "out"
    seen = {}
    with pytest.raises(exc):
        with atomic_output_dir(out) as tmp:
            seen["tmp"] = tmp
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
            (tmp / "model.safetensors").write_bytes(b"half")
            raise exc()
    assert not seen["tmp"].exists()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_existing_on_exception(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            assert (out / "old.txt").read_text() == "old"  # untouched while the new one is built
            raise RuntimeError
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _siblings(out) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert _siblings(out) == []


def test_atomic_dir_creates_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
