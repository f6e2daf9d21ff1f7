"""TensorFlow without its chatter: start-up lines dropped, real lines kept, own traces not 'retracing'."""
import io
import logging
import os

from cellnet.quiet import filtered_stderr, import_tensorflow


def test_chatter_is_dropped_and_other_lines_are_kept(capfd):
    with filtered_stderr():
        os.write(2, b"I0000 00:00:1.0 123 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")
        os.write(2, b"E0000 00:00:1.0 123 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err.splitlines() == ["a real problem"]


def test_one_trace_per_model_is_not_reported_as_retracing(tiny_prepared):
    """``evaluate`` runs the engine once per run: six models must not read as 'retracing'."""
    tf = import_tensorflow()
    from cellnet.evaluation.engine import predict_patches
    from cellnet.models import DirectCellularity

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    tf.get_logger().addHandler(handler)
    try:
        for _ in range(6):
            model = DirectCellularity("resnet34", "regression", width=0.01)
            frame = predict_patches(model, "regression", tiny_prepared, "eval", batch_size=2, progress=False)
    finally:
        tf.get_logger().removeHandler(handler)
    assert len(frame) > 2  # more than one batch, of two sizes
    assert "retracing" not in log.getvalue()
