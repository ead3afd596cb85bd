"""What every perf result carries (device, date, commit, torch) and how it is written out."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch


def run_info(device: torch.device | str) -> dict:
    """device (the GPU's name, or the CPU and its torch threads), date, commit, torch version."""
    device = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "torch": torch.__version__,
    }


def write_report(out_dir: str | Path, stem: str, result: dict, markdown: str) -> None:
    """<out_dir>/<stem>.json and <stem>.md, and the markdown on stdout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
