"""Probe: what loading the CUDA kernels at connect costs an endpoint, with Triton's
cache empty (a fresh machine) and full (every later start). Run on a GPU machine:
`python3 bench/probes/connect_compile.py`; prints one JSON line.

Each case runs in a process of its own over one cache directory: the cold process
finds it empty, the warm one finds what the cold one compiled. What is timed is what
a connect does (`batched_copy.load_kernels`, `nonfinite.load_kernels`): a trainer
loads the pack for every source dtype (with checksums, for either word size) and the
NaN/Inf pass; an engine the unpack for its wire dtype.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = {
    "engine": "from shardsync.runtime.wire import batched_copy as k\n"
              "k.load_kernels(d, torch.bfloat16, (torch.bfloat16,), to_bucket=False, sums=SUMS)",
    "trainer": "from shardsync.runtime.wire import batched_copy as k\n"
               "from shardsync.runtime import nonfinite\n"
               "k.load_kernels(d, torch.bfloat16, k.DTYPES, to_bucket=True, sums=SUMS, word_bytes=(2, 4))\n"
               "nonfinite.load_kernels(d)",
}


def _timed(body: str, sums: bool, cache: str) -> float:
    script = ("import time, torch\nd = torch.device('cuda')\ntorch.zeros(1, device=d)\n"
              f"SUMS = {sums}\nstarted = time.perf_counter()\n{body}\ntorch.cuda.synchronize()\n"
              "print(time.perf_counter() - started)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_CACHE_DIR": cache},
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    results = {}
    for name, body in CASES.items():
        for sums in (False, True):
            with tempfile.TemporaryDirectory() as cache:
                cold = _timed(body, sums, cache)
                warm = _timed(body, sums, cache)
            results[f"{name}{' with checksums' if sums else ''}"] = {"cold_s": round(cold, 3), "warm_s": round(warm, 3)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
