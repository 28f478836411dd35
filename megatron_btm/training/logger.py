"""Run logging on global rank 0: a JSONL log, TensorBoard, wandb (offline-capable), a progress bar."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool, wandb: bool,
                 wandb_project: str, config: dict[str, Any], progress: bool, total_steps: int,
                 start_step: int, name: str):
        self.enabled = enabled
        self.log_path = output_dir / "train_log.jsonl"
        self.tb = self.wb = self.bar = None
        if not enabled:
            return
        _truncate_log(self.log_path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_lib
            self.wb = wandb_lib.init(project=wandb_project, name=name, dir=str(output_dir),
                                     config=config, resume="allow", reinit=True)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step",
                            dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.wb is not None:
            self.wb.log(metrics, step=step)

    def progress(self, metrics: dict[str, float] | None) -> None:
        """One step done; `metrics` (None between log steps) updates the bar's postfix."""
        if self.bar is not None:
            self.bar.update(1)
            if metrics is not None:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _truncate_log(path: Path, start_step: int) -> None:
    """On resume, drop entries beyond the resumed step (written by the interrupted run)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= start_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)

