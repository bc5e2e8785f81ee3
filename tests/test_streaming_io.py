"""The rules of hf_cft.merging.streaming's reading and writing: safetensors headers (compact JSON padded to 8 bytes,
the ``format`` metadata, entries refused naming the tensor and the file), little-endian data on any host, shards
and the index (sizes by element size, names, ``total_size``), and the inputs' deltas (which keys a full model
contributes, fp32 deltas, checks on read) and their refusals, each message naming the offending thing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_cft.errors import BundleError, DeltaError, NonFiniteError
from hf_cft.merging import streaming
from hf_cft.merging.streaming import (
    SafetensorsFile,
    ShardedWriter,
    _DeltaInput,
    _Folder,
    _KeyDeltas,
    _ModelInput,
    _nonzero,
    open_input,
)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written by hand: 8-byte little-endian header length, the JSON header, the data."""
    head = json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def _header(path: Path) -> tuple[bytes, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], json.loads(raw[8 : 8 + n])


def _model_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


# ------------------------------------------------------------------------------------------------ reading


def test_unreadable_or_torn_header_entries_name_the_description_tensor_and_file(tmp_path):
    bad_dtype = _raw_safetensors(
        tmp_path / "dtype.safetensors", {"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)
    )
    with pytest.raises(BundleError) as err:
        SafetensorsFile(bad_dtype)
    assert str(err.value) == f"safetensors file: tensor 'w' of {str(bad_dtype)!r} has an unreadable header entry."
    no_shape = _raw_safetensors(tmp_path / "shape.safetensors", {"v": {"dtype": "F32", "data_offsets": [0, 4]}}, b"")
    with pytest.raises(BundleError) as err:
        SafetensorsFile(no_shape, "input 2")
    assert str(err.value) == f"input 2: tensor 'v' of {str(no_shape)!r} has an unreadable header entry."
    # 8 bytes claimed for one float32: the offsets disagree with dtype × shape
    torn = _raw_safetensors(
        tmp_path / "torn.safetensors", {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)
    )
    with pytest.raises(BundleError) as err:
        SafetensorsFile(torn, "base model")
    assert str(err.value) == f"base model: tensor 't' of {str(torn)!r} has a torn or inconsistent entry."


def test_a_tensor_cut_short_after_the_header_was_read_is_refused_as_truncated(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(3)}, str(path))
    f = SafetensorsFile(path, "input 1")
    last, first = sorted(f.entries, key=lambda k: -f.entries[k].start)
    path.write_bytes(path.read_bytes()[: f.entries[last].start + 4])  # the file shrinks between parsing and reading
    with pytest.raises(BundleError) as err:
        f.read(last)
    assert str(err.value) == f"input 1: tensor {last!r} of {str(path)!r} is truncated."
    assert f.read(first).tolist() == {"a": [0.0, 1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}[first]  # still whole


def _big_endian_bytes(values: list[float], dtype: str) -> bytes:
    """``values`` as the big-endian bytes a big-endian host holds in memory (bfloat16: the top half of a float32)."""
    if dtype == "BF16":
        return (np.array(values, ">f4").view(">u4") >> 16).astype(">u2").tobytes()
    return np.array(values, {"F32": ">f4", "F16": ">f2", "I64": ">i8", "I16": ">i2", "U8": "u1"}[dtype]).tobytes()


@pytest.mark.parametrize(
    "dtype, values",
    [
        ("F32", [1.5, -2.25, 2.0**-15]),
        ("F16", [0.5, -3.0, 1024.0]),
        ("BF16", [1.5, -2.0, 0.15625]),
        ("I64", [1, -2, 2**40]),
        ("I16", [258, -3, 7]),
        ("U8", [1, 2, 250]),
    ],
)
def test_big_endian_host_reads_every_dtype_right_by_swapping_each_elements_bytes(tmp_path, monkeypatch, dtype, values):
    """safetensors stores little-endian. A big-endian host reads the file's bytes into memory as they are, then swaps
    each element: simulated here by a host that says it is big-endian and a file whose bytes are what that host's
    memory must hold, so the swap is observable on this (little-endian) machine."""
    raw = _big_endian_bytes(values, dtype)
    header = {
        "s": {"dtype": dtype, "shape": [], "data_offsets": [0, len(raw) // 3]},  # a scalar first
        "t": {"dtype": dtype, "shape": [3], "data_offsets": [len(raw) // 3, len(raw) // 3 + len(raw)]},
    }
    path = _raw_safetensors(tmp_path / "big.safetensors", header, raw[: len(raw) // 3] + raw)
    monkeypatch.setattr(streaming.sys, "byteorder", "big")
    f = SafetensorsFile(path)
    got = f.read("t")
    assert got.dtype == streaming.DTYPES[dtype] and got.shape == (3,)
    assert got.tolist() == values
    scalar = f.read("s")
    assert scalar.shape == () and scalar.item() == values[0]


def test_big_endian_host_writes_little_endian_shards(tmp_path, monkeypatch):
    """The writer's side of the same rule: what a big-endian host holds in memory is swapped into the file's
    little-endian order (simulated as above: the file holds each element's bytes reversed)."""
    tensors = {
        "a": torch.tensor([1.5, -2.25], dtype=torch.float32),
        "b": torch.tensor([0.5, -3.0], dtype=torch.bfloat16),
        "c": torch.tensor([3, -4], dtype=torch.int64),
        "d": torch.tensor([5, 6], dtype=torch.uint8),
        "e": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # not contiguous
    }
    monkeypatch.setattr(streaming.sys, "byteorder", "big")
    writer = ShardedWriter(tmp_path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 10**6)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    path = tmp_path / "model.safetensors"
    f = SafetensorsFile(path)
    assert all(torch.equal(f.read(k), v) for k, v in tensors.items())  # the big-endian host reads them back
    raw = path.read_bytes()

    def stored(key):
        e = f.entries[key]
        return raw[e.start : e.start + e.nbytes]

    assert stored("a") == np.array([1.5, -2.25], ">f4").tobytes()
    assert stored("c") == np.array([3, -4], ">i8").tobytes()
    assert stored("d") == bytes([5, 6])
    assert stored("e") == np.array([0, 3, 1, 4, 2, 5], ">f4").tobytes()
    assert stored("b") == _big_endian_bytes([0.5, -3.0], "BF16")


def test_a_model_folders_files_carry_its_description_into_every_refusal(tmp_path):
    """A _Folder opens each file under the folder's description (not the default "safetensors file"), so a refusal
    from the header or from a read names the input."""
    folder = tmp_path / "f8"
    folder.mkdir()
    save_file({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(folder / "model.safetensors"))  # no torch name
    with pytest.raises(BundleError) as err:
        _Folder(folder, "input 3 (ft)")
    path = folder / "model.safetensors"
    assert str(err.value) == f"input 3 (ft): tensor 'w' of {str(path)!r} has an unreadable header entry."
    good = _model_folder(tmp_path / "good", {"w": torch.ones(4)})
    src = _Folder(good, "base model 'good'")
    assert src.folder == good and src.what == "base model 'good'"
    assert "w" in src and src.entry("w").shape == (4,)
    shard = good / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(BundleError) as err:
        src.read("w")
    assert str(err.value) == f"base model 'good': tensor 'w' of {str(shard)!r} is truncated."


# ------------------------------------------------------------------------------------------------ inputs


def test_a_full_model_input_contributes_floating_keys_but_logit_scale_at_any_depth(tmp_path):
    """Integer and bool tensors and every key whose last component is logit_scale are never merged; a floating key
    with or without dots is."""
    tensors = {
        "w": torch.ones(2),  # no dot at all
        "text.proj.weight": torch.ones(2, 2),
        "logit_scale": torch.tensor(2.0),
        "clip.logit_scale": torch.tensor(2.0),
        "text.proj.logit_scale": torch.tensor(2.0),
        "vision.position_ids": torch.arange(3),
        "mask": torch.ones(2, dtype=torch.bool),
        "half.bias": torch.ones(2, dtype=torch.float16),
    }
    base = _Folder(_model_folder(tmp_path / "base", tensors), "base model")
    ft = _ModelInput(_model_folder(tmp_path / "ft", tensors), base, "input 0")
    assert ft.delta_keys() == {"w", "text.proj.weight", "half.bias"}
    assert ft.description == "input 0"


def test_a_full_model_delta_is_fp32_and_subtracted_in_fp32(tmp_path):
    base_t = {"h": torch.tensor([1.0, 2048.0, -1.0], dtype=torch.float16), "b": torch.tensor([0.25, 2.0])}
    ft_t = {"h": torch.tensor([1.0009765625, 2050.0, 3.0], dtype=torch.float16), "b": torch.tensor([0.5, 1.0])}
    base = _Folder(_model_folder(tmp_path / "base", base_t), "base model")
    _model_folder(tmp_path / "ft", ft_t)
    inp = open_input(tmp_path / "ft", base, "input 0")
    assert isinstance(inp, _ModelInput)
    theta0 = torch.tensor([1.0, 2048.0, -1.0]) + torch.tensor([0.0, 0.0, 1e-3])  # an fp32 θ⁰ off the fp16 grid
    d = inp.delta("h", theta0)
    assert d.dtype == torch.float32
    assert d.tolist() == (torch.tensor([1.0009765625, 2050.0, 3.0]) - theta0).tolist()
    assert inp.delta("b", base.read("b")).tolist() == [0.25, -1.0]


def test_full_model_inputs_that_do_not_fit_the_base_are_refused_naming_key_input_and_shapes(tmp_path):
    base = _Folder(_model_folder(tmp_path / "base", {"w": torch.ones(3), "v": torch.ones(2, 2)}), "base model")
    _model_folder(tmp_path / "extra", {"w": torch.ones(3), "extra.weight": torch.ones(1)})
    with pytest.raises(DeltaError) as err:
        open_input(tmp_path / "extra", base, "input 1 (extra)")
    assert str(err.value) == (
        "Key 'extra.weight' of the input 1 (extra) is not in the base model; are they the same architecture?"
    )
    _model_folder(tmp_path / "shape", {"w": torch.ones(3), "v": torch.ones(4)})
    with pytest.raises(DeltaError) as err:
        open_input(tmp_path / "shape", base, "input 2")
    assert str(err.value) == "Key 'v' has shape (4,) in the input 2 but (2, 2) in the base model."


def test_an_input_folder_that_is_no_model_is_refused_under_its_description(tmp_path):
    base = _Folder(_model_folder(tmp_path / "base", {"w": torch.ones(3)}), "base model")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(BundleError) as err:
        open_input(empty, base, "input 0 (empty)")
    assert str(err.value) == f"input 0 (empty): no safetensors weights in {str(empty)!r}."
    (empty / "config.json").unlink()
    save_file({"w": torch.ones(3)}, str(empty / "model.safetensors"))  # weights without a config.json
    with pytest.raises(BundleError) as err:
        open_input(empty, base, "input 4")
    assert str(err.value) == (
        f"input 4: {str(empty)!r} is neither a PEFT adapter folder nor a model folder (config.json)."
    )


def test_an_in_memory_delta_is_read_as_fp32_and_an_fp32_one_as_is():
    d16 = torch.tensor([0.5, -1.25], dtype=torch.float16)
    dbf = torch.tensor([3.0, -0.5], dtype=torch.bfloat16)
    d32 = torch.tensor([1.0, 2.0])
    inp = _DeltaInput({"a": d16, "b": dbf, "c": d32}, "input 0")
    assert inp.delta_keys() == {"a", "b", "c"}
    for key, want in (("a", [0.5, -1.25]), ("b", [3.0, -0.5])):
        got = inp.delta(key, None)
        assert got.dtype == torch.float32 and got.tolist() == want
    assert inp.delta("c", None) is d32


def test_key_deltas_check_each_read_by_default_and_name_the_input(tmp_path):
    """The deltas at a key: an absent input gives zeros, a slice reads each in turn, and each read is checked
    (unless the caller checks the merged delta itself) naming the input with NaN/inf."""
    inputs = [
        _DeltaInput({"w": torch.tensor([1.0, 2.0])}, "input 0 (a)"),
        _DeltaInput({}, "input 1 (b)"),
        _DeltaInput({"w": torch.tensor([float("nan"), 1.0], dtype=torch.float16)}, "input 2 (c)"),
    ]
    present = [True, False, True]
    kd = _KeyDeltas(inputs, present, "w", (2,), lambda: None)
    assert len(kd) == 3
    first_two = kd[0:2]
    assert isinstance(first_two, list) and [t.tolist() for t in first_two] == [[1.0, 2.0], [0.0, 0.0]]
    assert [t.tolist() for t in kd[:-1][::-1]] == [[0.0, 0.0], [1.0, 2.0]]
    with pytest.raises(NonFiniteError) as err:
        kd[2]
    assert str(err.value) == "The delta of input 2 (c) holds NaN/inf at key 'w'."
    with pytest.raises(NonFiniteError, match=r"^The delta of input 2 \(c\) holds NaN/inf at key 'w'\.$"):
        kd[1:]
    unchecked = _KeyDeltas(inputs, present, "w", (2,), lambda: None, check=False)
    assert unchecked[2].isnan().tolist() == [True, False]
    with pytest.raises(NonFiniteError, match=r"input 2 \(c\)"):
        unchecked.check_inputs()


def test_a_key_counts_as_changed_when_any_entry_is_nonzero_even_off_the_sample_stride():
    t = torch.zeros(3 * 4096)  # sampled every 3rd entry
    assert not _nonzero(t)
    t[4] = 1e-30  # off the stride
    assert _nonzero(t)
    assert _nonzero(torch.tensor([0.0, -0.0, 2.0]))
    assert not _nonzero(torch.zeros(0))


# ------------------------------------------------------------------------------------------------ writing


def test_shard_header_is_compact_json_padded_to_8_bytes_with_format_metadata(tmp_path):
    plan = [("b", (3,), torch.int8), ("a", (2,), torch.float32)]
    writer = ShardedWriter(tmp_path, plan, 10**6, metadata={"merge": "ties"})
    writer.write("b", torch.tensor([1, 2, 3], dtype=torch.int8))
    writer.write("a", torch.tensor([0.5, 1.5]))
    assert writer.close() == ["model.safetensors"]
    raw, header = _header(tmp_path / "model.safetensors")
    want = {  # larger elements first: "a" (4 bytes) before "b" (1 byte)
        "__metadata__": {"format": "pt", "merge": "ties"},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I8", "shape": [3], "data_offsets": [8, 11]},
    }
    compact = json.dumps(want, separators=(",", ":")).encode("utf-8")
    assert raw == compact + b" " * (-len(compact) % 8) and len(raw) % 8 == 0
    assert header == want
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "merge": "ties"}
    bare = tmp_path / "bare"
    bare.mkdir()
    w = ShardedWriter(bare, [("x", (1,), torch.float32)], 10**6)
    w.write("x", torch.ones(1))
    w.close()
    assert SafetensorsFile(bare / "model.safetensors").metadata == {"format": "pt"}


def test_shards_fill_up_to_max_shard_size_by_each_dtypes_element_size(tmp_path):
    # 8 + 8 bytes of int8: exactly one 16-byte shard (at 4 bytes an element they would need two)
    one = ShardedWriter(tmp_path / "one", [("a", (8,), torch.int8), ("b", (8,), torch.uint8)], 16)
    assert one.names == ["model.safetensors"] and one.index_name is None
    # four 16-byte float32 tensors, 32 bytes a shard: exactly two shards of two
    plan = [(f"k{i}", (4,), torch.float32) for i in range(4)]
    two = ShardedWriter(tmp_path / "two", plan, 32)
    assert two.names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [[k for k, _, _ in shard] for shard in two._layout] == [["k0", "k1"], ["k2", "k3"]]


def test_sharded_output_index_maps_every_key_and_counts_tensor_bytes_only(tmp_path):
    """total_size is the sum of the tensors' bytes over every shard (no headers); the index and the shard names
    keep every dot of the file name before the suffix."""
    plan = [
        ("k0", (4,), torch.float32),
        ("k1", (4,), torch.float32),
        ("k2", (2,), torch.float64),
        ("k3", (3,), torch.int8),
    ]
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, plan, 32, filename="model.fp16.safetensors")
    assert writer.written == 0
    writer.write("k1", torch.ones(4))  # before its turn: waits in memory, not written yet
    assert writer.written == 0
    writer.write("k0", torch.zeros(4))
    assert writer.written == 2
    writer.write("k3", torch.tensor([1, 2, 3], dtype=torch.int8))
    writer.write("k2", torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert writer.written == 4
    names = ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"]
    assert writer.close() == [*names, "model.fp16.safetensors.index.json"]
    index = json.loads((out / "model.fp16.safetensors.index.json").read_text(encoding="utf-8"))
    assert index == {
        "metadata": {"total_size": 16 + 16 + 16 + 3},
        "weight_map": {"k0": names[0], "k1": names[0], "k2": names[1], "k3": names[1]},
    }
    second = SafetensorsFile(out / names[1])
    assert second.read("k2").tolist() == [0.5, -0.5] and second.read("k3").tolist() == [1, 2, 3]


def test_writer_refusals_name_the_key_the_tensor_and_the_plan(tmp_path):
    plan = [(f"k{i}", (2, 3), torch.float32) for i in range(4)]
    writer = ShardedWriter(tmp_path, plan, 2 * 24)
    with pytest.raises(DeltaError) as err:
        writer.write("k0", torch.zeros(3, 2, dtype=torch.float64))
    assert str(err.value) == "Key 'k0': writing torch.float64 (3, 2), planned torch.float32 (2, 3)."
    writer.write("k0", torch.zeros(2, 3))
    writer.write("k1", torch.zeros(2, 3))
    writer.write("k3", torch.zeros(2, 3))  # k2 never comes
    with pytest.raises(DeltaError) as err:
        writer.close()
    assert (
        str(err.value) == "Output shard 'model-00002-of-00002.safetensors' was not completed (key 'k2' not written)."
    )
    writer.abort()
