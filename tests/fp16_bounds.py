"""fp16 error bounds of the ten ANE kernels, shared by the MIL and sim tests."""
import numpy as np

U = 2.0 ** -11   # unit roundoff of fp16

# Error is measured as max |sim - ref| / max |ref| per output block: inputs are rounded to
# fp16 (relative error <= U each) and every op rounds its result once (<= U of the value).
# A single weight product therefore errs by about U * |y| from its output rounding plus
# input roundings that add up like a random walk (sqrt(C) terms of size U|a||w|, against an
# output of size sqrt(C)|a||w|): one to two U.  Kernels that chain more ops accumulate
# about one U per rounding on their path.  Attention adds the softmax's sensitivity: a
# score s is stored with an absolute error of about U*|s|, which moves its probability by
# about p*U*|s|, so peaked attention (|s| ~ 10 with these inputs) costs ~10 U.  The
# backward adds the cancellation in dprobs - rowsum(probs*dprobs), which fp16 resolves
# only to U * |dprobs|: large relative to the output when rows are nearly one-hot, which
# happens mostly for very short sequences.  Measured over 25 seeds and the four configs the
# worst cases are 2 U (one or two products), 2.5 U (ffnFused), 10.7 U (sdpaFwd, GQA attn),
# 6 U (sdpaBwd1) and 8.3 U (sdpaBwd2, S=5; 3 U at S=32); the bounds below are above those
# (the tests use seed 0).  A wrong layout, head mapping, sign or formula errs by O(1),
# i.e. by hundreds or thousands of U.
TOLERANCE = {
    "woFwd": 4 * U, "ffnBwdW2t": 4 * U, "wotBwd": 4 * U, "qBwd": 4 * U,
    "ffnBwdW13t": 4 * U, "kvBwd": 4 * U,          # two products and an add
    "ffnFused": 6 * U,                            # product, sigmoid, 2 muls, product, add
    "sdpaFwd": 16 * U,    # projections, QK-norm (7 ops), RoPE (3), scale, scores, softmax, PV
    "sdpaBwd1": 10 * U,   # scale, scores, softmax, then one product each
    "sdpaBwd2": 12 * U,   # mul, row sum, sub (cancellation), mul, scale, product
}


def max_rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
