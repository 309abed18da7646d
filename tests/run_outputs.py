"""Reading a run directory in the multi-process tests: metrics.jsonl rows and model.safetensors tensors."""
import array
import json
import struct


def metrics(run_dir):
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]


def weights(run_dir):
    """The float32 tensors of RUN_DIR/model.safetensors by name, as flat arrays."""
    raw = open(f"{run_dir}/model.safetensors", "rb").read()
    (length,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + length])
    header.pop("__metadata__", None)
    return {name: array.array("f", raw[8 + length + t["data_offsets"][0]:8 + length + t["data_offsets"][1]])
            for name, t in header.items() if t["dtype"] == "F32"}
