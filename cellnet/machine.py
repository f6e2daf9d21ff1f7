"""Facts about the machine that decide which kernels run: CPU model, SIMD flags, TF and oneDNN.

``python -m cellnet.machine`` prints them (CI does, before the tests, so a crash on one CPU can
be told from a crash on another); ``cellnet bench`` records them beside its figures.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

#: The instruction-set flags that change which oneDNN/Eigen kernels run.
SIMD = re.compile(r"^(avx512\w*|amx\w*|avx_vnni|avx2|fma|f16c|avx)$")


def cpu() -> dict:
    """``{"model": ..., "simd": [...], "cores": n}`` from /proc/cpuinfo (empty where absent)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                    break
    except OSError:
        pass
    return {"model": model, "simd": sorted(f for f in set(flags) if SIMD.match(f)),
            "cores": os.cpu_count()}


def reduced_precision_support() -> dict[str, bool]:
    """Whether this CPU computes bfloat16 / float16 natively (else TF emulates them, slowly).

    bfloat16: AVX512-BF16 or AMX-BF16 (oneDNN's bf16 kernels); float16: AVX512-FP16 or AMX-FP16.
    """
    simd = set(cpu()["simd"])
    return {"bfloat16": bool(simd & {"avx512_bf16", "amx_bf16"}),
            "float16": bool(simd & {"avx512_fp16", "amx_fp16"})}


def onednn() -> str:
    """oneDNN's version and the ISA it dispatches to, from a child process's verbose output."""
    probe = ("import tensorflow as tf\n"
             "tf.nn.conv2d(tf.ones([1, 8, 8, 16]), tf.ones([3, 3, 16, 16]), 1, 'SAME')\n")
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=env, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    version = re.search(r"oneDNN (v[\d.]+)", out)
    isa = re.search(r"isa:([^\n]+)", out)
    if not version:
        return "not used (TF_ENABLE_ONEDNN_OPTS=0?)"
    return f"{version.group(1)}, isa {isa.group(1).strip() if isa else 'unknown'}"


def describe() -> str:
    from cellnet.quiet import import_tensorflow

    tf = import_tensorflow()
    import keras

    facts = cpu()
    return "\n".join([
        f"cpu: {facts['model']} ({facts['cores']} cores)",
        f"simd: {' '.join(facts['simd']) or 'none reported'}",
        f"avx512/amx: {' '.join(f for f in facts['simd'] if f.startswith(('avx512', 'amx'))) or 'none'}",
        "native 16-bit compute: " + (", ".join(k for k, v in reduced_precision_support().items() if v)
                                     or "none (bfloat16/float16 exports run emulated here)"),
        f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}",
        f"oneDNN: {onednn()} (TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')})",
    ])


if __name__ == "__main__":
    print(describe())
