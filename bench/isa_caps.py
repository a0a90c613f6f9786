"""Do the kernel-library ISA caps take effect in this torch? Products per format under each cap.

textgen/model/cpu.py reads ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS and ATEN_CPU_CAPABILITY to know what
this process may use; this script checks, on the machine at hand, that each cap changes what it is expected
to change and nothing else. Every configuration runs in a fresh interpreter (the libraries read their
variable once, at first use), 2 threads, GPT-2's MLP shape (768 -> 3072; cache-resident, so these are
compute rates, not memory bandwidth) at 1 and 32 rows, plus a 1024^3 GEMM:

- float32 and bfloat16 `F.linear` (float32 is oneMKL's, bfloat16 oneDNN's where oneDNN accepts it);
- textgen's int8 product, `_weight_int8pack_mm` (ATen's kernel), with bfloat16 and float32 activations;
- torch.backends.cpu.get_cpu_capability(), and the ISA oneDNN and oneMKL report in their verbose logs.

    python bench/isa_caps.py       # bench/results/isa-caps.{md,json}; ~1 minute on 2 idle cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, dict[str, str]] = {
    "none": {},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ONEDNN_MAX_CPU_ISA=AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "ONEDNN_MAX_CPU_ISA=avx2 (lower case)": {"ONEDNN_MAX_CPU_ISA": "avx2"},
    "ONEDNN_MAX_CPU_ISA=BOGUS": {"ONEDNN_MAX_CPU_ISA": "BOGUS"},
    "DNNL_MAX_CPU_ISA=AVX2": {"DNNL_MAX_CPU_ISA": "AVX2"},
    "MKL_ENABLE_INSTRUCTIONS=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "MKL_ENABLE_INSTRUCTIONS=avx2 (lower case)": {"MKL_ENABLE_INSTRUCTIONS": "avx2"},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ATEN_CPU_CAPABILITY=AVX2 (upper case)": {"ATEN_CPU_CAPABILITY": "AVX2"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "all three at AVX2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    },
}
CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
OUT_F, IN_F = 3072, 768


def measure(threads: int) -> dict[str, Any]:
    """GFLOP/s per product in this process (run in the child)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)

    def gflops(flop: float, fn: Any, reps: int = 30) -> float:
        fn()
        fn()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return round(flop / best / 1e9, 1)

    out: dict[str, Any] = {"torch_capability": str(torch.backends.cpu.get_cpu_capability())}
    with torch.inference_mode():
        w32 = torch.randn(OUT_F, IN_F)
        w16 = w32.bfloat16()
        w8 = (w32 * 30).clamp(-127, 127).to(torch.int8)
        for rows in (1, 32):
            x32 = torch.randn(rows, IN_F)
            x16 = x32.bfloat16()
            s32 = torch.ones(OUT_F)
            s16 = s32.bfloat16()
            flop = 2.0 * rows * IN_F * OUT_F
            out[f"float32 x{rows}"] = gflops(flop, lambda: F.linear(x32, w32))
            out[f"bfloat16 x{rows}"] = gflops(flop, lambda: F.linear(x16, w16))
            int8mm = torch.ops.aten._weight_int8pack_mm
            out[f"int8, bf16 act. x{rows}"] = gflops(flop, lambda: int8mm(x16, w8, s16))
            out[f"int8, fp32 act. x{rows}"] = gflops(flop, lambda: int8mm(x32, w8, s32))
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        out["float32 GEMM 1024"] = gflops(2.0 * 1024**3, lambda: F.linear(a, b), 5)
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["bfloat16 GEMM 1024"] = gflops(2.0 * 1024**3, lambda: F.linear(a16, b16), 5)
    return out


def verbose(env: dict[str, str]) -> dict[str, str]:
    """What oneDNN and oneMKL say they dispatch to, and which kernel ran a 32-row bfloat16 product; `env`
    is the child's whole environment."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "torch.mm(torch.randn(64, 64), torch.randn(64, 64))\n"
        "F.linear(torch.randn(32, 768).bfloat16(), torch.randn(3072, 768).bfloat16())\n"
        # an int8 product always goes through oneDNN, so its ISA line is printed even when bfloat16 is not
        "torch._int_mm(torch.ones(32, 64, dtype=torch.int8), torch.ones(64, 64, dtype=torch.int8))\n"
    )
    full = {**env, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    text = run.stdout + run.stderr
    onednn = re.search(r"onednn_verbose,.*?,info,cpu,isa:(.*)", text)
    mkl = re.search(r"MKL_VERBOSE oneMKL [^\n]*? for Intel\(R\) 64 architecture (.*?), Lnx", text)
    matmul = re.search(r"onednn_verbose,.*?,exec,cpu,matmul,([^,]+),[^,]*,src:bf16", text)
    return {
        "onednn_isa": onednn[1].strip() if onednn else "",
        "mkl_isa": mkl[1].strip() if mkl else "",
        "bf16_matmul": matmul[1] if matmul else "not oneDNN",
    }


def markdown(report: dict[str, Any]) -> str:
    rows = report["configs"]
    keys = [k for k in rows[0]["gflops"] if k != "torch_capability"]
    lines = [
        f"# ISA caps on {report['cpu']['model']} ({report['cpu']['raw_isa_class']}), "
        f"{report['threads']} threads, torch {report['torch']}, {report['date']}",
        "",
        "`python bench/isa_caps.py`: GFLOP/s per product, each configuration in a fresh interpreter. "
        f"Shapes: GPT-2's MLP ({IN_F} -> {OUT_F}) at 1 and 32 rows (cache-resident: compute, not memory), "
        "and a 1024^3 GEMM. int8 is textgen's weight-only `_weight_int8pack_mm`.",
        "",
        "| caps | torch capability | " + " | ".join(keys) + " | oneDNN ISA | oneMKL ISA | bf16 x32 kernel |",
        "| --- | --- | " + " | ".join("---:" for _ in keys) + " | --- | --- | --- |",
    ]
    for row in rows:
        g, v = row["gflops"], row["verbose"]
        lines.append(
            f"| {row['name']} | {g['torch_capability']} | "
            + " | ".join(str(g[k]) for k in keys)
            + f" | {v['onednn_isa']} | {v['mkl_isa']} | {v['bf16_matmul']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.threads)))
        return
    sys.path.insert(0, str(ROOT))
    import torch

    from textgen.model.cpu import describe

    # The parent's own environment must not cap anything, or "none" would not be the reference.
    base = {k: v for k, v in os.environ.items() if k not in CAP_VARIABLES}
    report: dict[str, Any] = {
        "cpu": describe(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": str(dt.date.today()),
        "configs": [],
    }
    for name, env in CONFIGS.items():
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads)]
        run = subprocess.run(command, env={**base, **env}, capture_output=True, text=True, check=True)
        row = {
            "name": name,
            "env": env,
            "gflops": json.loads(run.stdout.strip().splitlines()[-1]),
            "verbose": verbose({**base, **env}),
        }
        print(json.dumps(row), flush=True)
        report["configs"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "isa-caps.json").write_text(json.dumps(report, indent=1))
    (args.out / "isa-caps.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
