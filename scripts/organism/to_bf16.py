#!/usr/bin/env python3
"""Rewrites DIR/model.safetensors in bf16 (every floating tensor) and sets config.json's
torch_dtype: the larger organism ships as real checkpoints do.

  scripts/organism/to_bf16.py DIR
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip())
    d = sys.argv[1]
    path = os.path.join(d, "model.safetensors")
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
          for k, v in load_file(path).items()}
    save_file(sd, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    cpath = os.path.join(d, "config.json")
    with open(cpath) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "bfloat16"
    if "dtype" in cfg:
        cfg["dtype"] = "bfloat16"
    with open(cpath + ".tmp", "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(cpath + ".tmp", cpath)


if __name__ == "__main__":
    main()
