"""The llama.cpp side of bench/bench_sample.py, run by the interpreter of an environment that
has llama-cpp-python (it imports nothing else, so anecy's environment need not have it).

    python llama_cpp_rates.py MODEL.gguf THREADS CONTEXT

Loads the GGUF file once, then for each line "PROMPT_IDS;DECODE_IDS" (space-separated ids)
read from stdin prints one JSON line {"prefill_s": ..., "decode_s": [...]}: the seconds to
evaluate the prompt in one batch from an empty cache, then the seconds of each following
single-token evaluation. An empty line ends it.
"""
import json
import sys
import time

import llama_cpp


def main():
    path, threads, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=context, n_ubatch=context,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    print(json.dumps({"ready": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            return
        prompt, decode = ([int(t) for t in part.split()] for part in line.split(";"))
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - t0
        decode_s = []
        for token in decode:
            t0 = time.perf_counter()
            llm.eval([token])
            decode_s.append(time.perf_counter() - t0)
        print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s}), flush=True)


if __name__ == "__main__":
    main()
