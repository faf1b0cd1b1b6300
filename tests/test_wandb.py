"""Weights & Biases logging in offline mode: the run's records (train and eval scalars, the
resolved config) land in RUN_DIR/wandb's record log, read back here; without wandb installed
log.wandb is one line naming the extra."""

import glob
import json
import struct

import pytest

from maxtrain.cli import main

wandb = pytest.importorskip("wandb")


def read_records(path):
    """wandb's record log: a 7-byte file header, then LevelDB-style chunks (7-byte header:
    crc, length, type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, records, pending = open(path, "rb").read(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        if length == 0 and kind == 0:
            break
    return records


@pytest.mark.slow
def test_offline_run_logs_train_and_eval_scalars_and_config(tmp_path):
    run_dir = tmp_path / "run"
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert main(["train", "model=tiny-llama", "model.vocab_size=320", f"run_dir={run_dir}", "steps=4", "train.seq_len=32",
                 "train.global_batch=8", f"data.sources=[{{type: text, path: '{tmp_path}/t.txt', documents: per_file}}]",
                 "data.eval_fraction=0", f"eval.sets={{val: [{{type: text, path: '{tmp_path}/t.txt'}}]}}", "eval.every=2",
                 "data.tokenizer.model_type=char", "log.every=1", "log.tensorboard=false",
                 "log.wandb={project: maxtrain-test, mode: offline}"]) == 0  # fmt: skip
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history, config = [], {}
    for r in read_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":  # the run record carries the config given to wandb.init
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    logged = {(h["_step"], k): v for h in history for k, v in h.items()}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:  # every scalar of metrics.jsonl, at its step
        for k, v in m.items():
            if k != "step":
                assert logged[(m["step"], k)] == pytest.approx(v, rel=1e-6), k
    assert any("eval_loss/val" == k for _, k in logged)
    assert config["steps"] == 4 and config["model"]["d_model"] == 64 and config["model"]["vocab_size"] == 320


def test_missing_wandb_is_one_line(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    code = main(["train", "model=tiny-llama", f"run_dir={tmp_path}/run", "log.wandb={project: x, mode: offline}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'maxtrain[wandb]'" in err, err
    assert not (tmp_path / "run").exists()
