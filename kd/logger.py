"""log.csv: one row per finished epoch, the whole file rewritten atomically with each new row."""
import csv
import io
import os

from kd.checkpoint import atomic_write


class CSVLogger:
    """Epoch rows in a CSV file whose header is the keys of the first row.

    keep_epochs=k (on resume) keeps only the rows of epochs 1..k, so a run killed after logging
    epoch k+1 but before checkpointing it gets no duplicate rows. A crash at any moment leaves
    the previous complete file (kd.checkpoint.atomic_write); 120 rows take microseconds to write.
    """

    def __init__(self, path: str, keep_epochs: int = 0):
        self.path, self.rows = path, []
        if keep_epochs and os.path.exists(path):
            with open(path, newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= keep_epochs]
            self._write()

    def log(self, row: dict) -> None:
        self.rows.append({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        if not self.rows:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))
