"""Load time of a registry model from its packed GGUF versus the converted safetensors cache.

transformers dequantizes GGUF to dense weights on every load; ltd converts once and then
loads plain safetensors. Generation speed is the same either way (the weights in memory
are identical dense fp32), so load time is the difference.

    .venv/bin/python experiments/load_time.py smollm2-135m
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltd.bench.machine import machine_info
from ltd.models import converted_dir, registry_gguf
from ltd.registry import REGISTRY


def main(name: str = "smollm2-135m") -> None:
    entry = REGISTRY[name]
    gguf = registry_gguf(entry)
    t0 = time.perf_counter()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    a = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    t_gguf = time.perf_counter() - t0
    t0 = time.perf_counter()
    AutoTokenizer.from_pretrained(str(converted_dir(entry)))
    b = AutoModelForCausalLM.from_pretrained(str(converted_dir(entry)), dtype=torch.float32)
    t_st = time.perf_counter() - t0
    same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    print(json.dumps({"model": name, "gguf_load_s": round(t_gguf, 2), "safetensors_load_s": round(t_st, 2),
                      "identical_weights": same, "cpu": machine_info("float32", "cpu")["cpu_model"],
                      "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main(*sys.argv[1:])
