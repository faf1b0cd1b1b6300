"""Damaged safetensors are one line and exit 2 before anything is written: truncated files, malformed headers."""

import json
import struct

import numpy as np
import pytest

from maxtrain.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama saved by transformers (no downloads)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _convert_error(capsys, hf, out) -> str:
    assert main(["convert", "from-hf", str(hf), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()  # refused before writing anything
    return err


def test_truncated_file_is_one_line(hf_dir, tmp_path, capsys):
    hf = _copy(hf_dir, tmp_path / "hf")
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])  # a download cut short
    err = _convert_error(capsys, hf, tmp_path / "out")
    assert f"'{weights}' is truncated" in err and f"the file has {len(data) - 1000} (1000 missing)" in err


def test_malformed_header_entry_is_one_line(hf_dir, tmp_path, capsys):
    hf = _copy(hf_dir, tmp_path / "hf")
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["data_offsets"] = [10, 2]  # end before start
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    err = _convert_error(capsys, hf, tmp_path / "out")
    assert f"gives tensor {name} the byte range 10..2" in err


def test_intact_file_reads_every_tensor(hf_dir, tmp_path):
    from maxtrain.convert.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(hf_dir)
    assert all(np.isfinite(reader.read(n)).all() for n in reader.tensors)
