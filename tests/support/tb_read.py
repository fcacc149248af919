#!/usr/bin/env python3
"""Reads a TensorBoard log directory the way TensorBoard does; prints JSON.

Usage: tb_read.py EVENT_DIR

The Rust tests write event files with medzero's own writer and compare what
TensorBoard's EventAccumulator makes of them. Output (one JSON object):

  {"files": {name: {"records": n, "file_version": str}},
   "scalars": {tag: [[step, value], ...]},
   "histograms": {tag: [[step, {"min", "max", "num", "sum", "sum_squares",
                                "bucket_limit", "bucket"}], ...]},
   "text": {tag: [[step, text], ...]},
   "tensors": {tag: [[step, [values...]], ...]},   # non-text tensors
   "hparams": {name: value}}                        # the HParams tab's session

Non-finite floats are written as the strings "nan", "inf" and "-inf" so the
output stays strict JSON.

Before that, every event file is walked record by record with both TFRecord
CRCs checked: the accumulator itself silently stops at a bad record, which
would turn a framing bug into merely "missing" data. A bad file exits 1.
"""

import json
import math
import os
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util


def num(x):
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def check_file(path):
    """Returns (record count, file_version of the first record)."""
    with open(path, "rb") as f:
        data = f.read()
    pos, count, version = 0, 0, None
    while pos < len(data):
        if len(data) - pos < 12:
            raise ValueError(f"{path}: truncated header at byte {pos}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if masked_crc32c(header) != header_crc:
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        body = data[pos + 12 : pos + 12 + length]
        crc_bytes = data[pos + 12 + length : pos + 16 + length]
        if len(body) < length or len(crc_bytes) < 4:
            raise ValueError(f"{path}: truncated record at byte {pos}")
        if masked_crc32c(body) != struct.unpack("<I", crc_bytes)[0]:
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        if count == 0:
            version = event_pb2.Event.FromString(body).file_version
        pos += 16 + length
        count += 1
    return count, version


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    logdir = sys.argv[1]

    files = {}
    for name in sorted(os.listdir(logdir)):
        if "tfevents" in name:
            try:
                count, version = check_file(os.path.join(logdir, name))
            except ValueError as e:
                sys.exit(f"tb_read: {e}")
            files[name] = {"records": count, "file_version": version}

    keep_all = {
        ea.SCALARS: 0,
        ea.HISTOGRAMS: 0,
        ea.COMPRESSED_HISTOGRAMS: 0,
        ea.TENSORS: 0,
        ea.IMAGES: 0,
        ea.AUDIO: 0,
    }
    acc = ea.EventAccumulator(logdir, size_guidance=keep_all)
    acc.Reload()
    tags = acc.Tags()

    scalars = {
        tag: [[e.step, num(e.value)] for e in acc.Scalars(tag)]
        for tag in tags[ea.SCALARS]
    }

    histograms = {}
    for tag in tags[ea.HISTOGRAMS]:
        histograms[tag] = [
            [
                e.step,
                {
                    "min": num(h.min),
                    "max": num(h.max),
                    "num": num(h.num),
                    "sum": num(h.sum),
                    "sum_squares": num(h.sum_squares),
                    "bucket_limit": [num(x) for x in h.bucket_limit],
                    "bucket": [num(x) for x in h.bucket],
                },
            ]
            for e in acc.Histograms(tag)
            for h in [e.histogram_value]
        ]

    try:
        text_tags = set(acc.PluginTagToContent("text"))
    except KeyError:  # no text plugin data in this run
        text_tags = set()
    text, tensors = {}, {}
    for tag in tags[ea.TENSORS]:
        series = []
        for e in acc.Tensors(tag):
            array = tensor_util.make_ndarray(e.tensor_proto)
            if tag in text_tags:
                values = [b.decode("utf-8") for b in array.flatten()]
                series.append([e.step, values[0] if array.ndim == 0 else values])
            else:
                series.append([e.step, [num(x) for x in array.flatten()]])
        (text if tag in text_tags else tensors)[tag] = series

    # The HParams tab's data: each session's hyperparameters by name.
    hparams = {}
    try:
        contents = acc.PluginTagToContent("hparams")
    except KeyError:
        contents = {}
    if contents:
        from tensorboard.plugins.hparams import plugin_data_pb2

        for content in contents.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            for name, value in data.session_start_info.hparams.items():
                kind = value.WhichOneof("kind")
                hparams[name] = getattr(value, kind) if kind else None

    json.dump(
        {
            "files": files,
            "hparams": hparams,
            "scalars": scalars,
            "histograms": histograms,
            "text": text,
            "tensors": tensors,
        },
        sys.stdout,
        allow_nan=False,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
