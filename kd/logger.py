"""log.csv: one row per finished epoch, flushed as soon as it is written."""
import csv
import io
import os

from kd.checkpoint import atomic_write


class CSVLogger:
    """Appends epoch rows to a CSV file with a fixed header.

    keep_epochs=k (on resume) first rewrites the file, atomically, with only the rows of epochs
    1..k, so a run killed after logging epoch k+1 but before checkpointing it gets no duplicate rows.
    """

    def __init__(self, path: str, columns: list[str], keep_epochs: int = 0):
        self.path = path
        self.columns = columns
        text = io.StringIO()
        header = csv.DictWriter(text, fieldnames=columns)
        header.writeheader()
        header.writerows(self._read_rows(keep_epochs) if keep_epochs else [])
        atomic_write(path, lambda f: f.write(text.getvalue().encode()))
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns)

    def _read_rows(self, keep_epochs: int) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["epoch"]) <= keep_epochs]

    def log(self, row: dict) -> None:
        self.writer.writerow({k: _fmt(row.get(k, "")) for k in self.columns})
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value
