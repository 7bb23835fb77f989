"""Time and size of every GGUF quant for a finished run (the numbers in docs/gguf-and-ollama.md).

    python bench/gguf_quants.py RUN_DIR [--no-verify]

Runs the gguf exporter on RUN_DIR with all quant types (reusing a merged_16bit export when
there is one) and prints one row per quant: file size, wall and CPU seconds to make it
(f16/bf16/q8_0 from the merged HF folder in Python; K-quants from the F16 file with
llama.cpp), the tensor types llama.cpp chose, and the verification result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sft.engine.export import export_run
from sft.plugins.exporters.gguf.quants import ALL_QUANTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    overrides = [f"export.gguf.quants=[{','.join(ALL_QUANTS)}]", f"export.verify={str(not args.no_verify).lower()}"]
    export_run(args.run_dir, ["gguf"], overrides)
    record = json.loads((args.run_dir / "summary.json").read_text())["exports"]["gguf"]
    print(f"\n| quant | size (MB) | wall s | CPU s | tensor types | verification |")
    print("|---|---:|---:|---:|---|---|")
    for quant, info in record["details"]["quants"].items():
        types = ", ".join(f"{t} {n}" for t, n in sorted(info["tensor_types"].items(), key=lambda kv: -kv[1]))
        verify = info.get("verify", {}).get("summary", "-")
        print(f"| {quant} | {info['bytes'] / 1e6:.1f} | {info['seconds']:.1f} | {info.get('cpu_seconds', 0):.1f} "
              f"| {types} | {verify} |")
    if record.get("error"):
        print("\nerrors:", record["error"])


if __name__ == "__main__":
    main()
