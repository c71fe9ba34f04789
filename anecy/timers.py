"""The parts a training step's time is charged to: the one owner of their names.

Pure Python, so that the command line and the reports can name them without loading the
compiled core. docs/ARCHITECTURE.md, section 2 (One training step), says what each covers."""

# The engine's timer slots, in the order of its T_* slot numbers (_engine.pyx):
#   kernels      the ten kernel calls, net of their I/O
#   rms          RMSNorm forward and backward (layer, QK and final norms)
#   classifier   the classifier sgemms and softmax + cross-entropy
#   elementwise  embedding, residuals, SwiGLU backward, RoPE backward, GQA reduce
#   dw_wait      waiting for the worker's weight-gradient jobs
#   dw           weight-gradient sgemms run inline (async_dw off)
ENGINE_TIMERS = ("kernels", "rms", "classifier", "elementwise", "dw_wait", "dw")

# Engine.timings(): the slots plus "io", the backend's packing and unpacking of kernel I/O
STEP_TIMERS = ENGINE_TIMERS + ("io",)

# The progress line and the Efficiency Report, in this order; the trainer adds "optimizer"
# (gradient norm, clipping, AdamW and restaging the weights)
REPORT_ORDER = ("kernels", "io", "classifier", "elementwise", "rms", "dw", "dw_wait",
                "optimizer")
