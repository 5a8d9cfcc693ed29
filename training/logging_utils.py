"""Run logging: one JSON object per line in ``log.jsonl`` (train steps, evals, start/resume/done) and the same
scalars in TensorBoard when it is installed. Only rank 0 writes."""
from __future__ import annotations

import json
import os


class JsonlLogger:
    """Append records to ``out_dir/log.jsonl`` (flushed per record); ``enabled=False`` (other ranks) is a no-op."""

    def __init__(self, out_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.f = open(os.path.join(out_dir, "log.jsonl"), "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, record: dict) -> None:
        """Write ``record`` (a flat dict of JSON values; numeric ones also go to TensorBoard under its ``kind``)."""
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
