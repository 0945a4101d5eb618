"""Embedding on the GPU against the CPU with llama-cpp-python built with CUDA: throughput and cosine.

    python bench/gpu_embed.py models/gguf/all-MiniLM-L6-v2.f16.gguf

Run on a GPU host where llama-cpp-python was built with -DGGML_CUDA=on (compose/Dockerfile.cuda).
Measured on an H200 (2026-11-26), docs/packaging.md "CUDA build checked on a GPU".
"""

import math
import sys
import time

import llama_cpp

path = sys.argv[1]
print("llama_supports_gpu_offload:", llama_cpp.llama_supports_gpu_offload())
texts = [
    f"Passage {i}: the boiler in building {i % 7} is inspected every {i % 12 + 1} months; "
    "the valve pressure is logged." * 3
    for i in range(400)
]


def load(ngl):
    return llama_cpp.Llama(
        model_path=path,
        embedding=True,
        n_ctx=512,
        n_batch=512,
        n_ubatch=512,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_gpu_layers=ngl,
        n_threads=16,
        n_threads_batch=16,
        verbose=False,
    )


def norm(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


res = {}
for name, ngl in (("cpu", 0), ("gpu", -1)):
    m = load(ngl)
    m.embed(texts[0])
    t = time.time()
    vecs = [norm(m.embed(x)) for x in texts]
    dt = time.time() - t
    toks = sum(len(m.tokenize(x.encode())) for x in texts)
    print(
        f"{name}: {len(texts)} passages one per call in {dt:.2f} s = "
        f"{len(texts) / dt:.0f} passages/s, {toks / dt:.0f} tokens/s"
    )
    res[name] = vecs
    m.close()
cos = [sum(a * b for a, b in zip(x, y, strict=True)) for x, y in zip(res["cpu"], res["gpu"], strict=True)]
print(f"cosine(cpu, gpu): min {min(cos):.6f} mean {sum(cos) / len(cos):.6f}")
