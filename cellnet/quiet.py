"""Import TensorFlow without its start-up chatter.

On a machine without a GPU, TensorFlow 2.21 writes absl INFO lines ("Could not find cuda
drivers", "This TensorFlow binary is optimized ...") and an ``E ... failed call to cuInit``
line straight to file descriptor 2, some before ``TF_CPP_MIN_LOG_LEVEL`` is read and the
last at any level below 3. They say nothing to a user, so the import (and the device
discovery that prints the cuInit line) runs with fd 2 captured; lines that are not known
chatter are written back, so a real warning or error still shows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Iterator

#: Lines TensorFlow prints at start-up that carry no information for a user.
CHATTER = re.compile(
    r"absl::InitializeLog\(\)|cudart_stub\.cc|cuda_platform\.cc.*cuInit|cuda_driver\.cc.*cuInit"
    r"|cpu_feature_guard\.cc|^To enable the following instructions|rebuild TensorFlow with the"
    r"|oneDNN custom operations are on|TF_ENABLE_ONEDNN_OPTS=0|Unable to register cu(DNN|FFT|BLAS)"
    r"|computation placer already registered|TF-TRT Warning|cuda_executor\.cc.*NUMA"
)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture fd 2 for the block; afterwards write back every line that is not ``CHATTER``."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not CHATTER.search(line)]
            for line in kept:
                print(line, file=sys.stderr)


#: cellnet's per-model ``tf.function``s: each traces exactly once (a fixed input signature), but
#: TensorFlow counts traces by code object across instances and calls one trace per model, in a
#: loop over runs, "frequent retracing".
OWN_TRACES = re.compile(r"calls to <function (predict_averaged|segment_regions|segmenter_features|ensemble_fn)\.<locals>\.")


class _OwnTracesFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not OWN_TRACES.search(record.getMessage())


def import_tensorflow():
    """``import tensorflow`` and discover devices, quietly; returns the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    tf.get_logger().addFilter(_OwnTracesFilter())
    return tf
