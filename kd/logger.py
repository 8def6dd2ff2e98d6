"""log.csv: one row per finished epoch, flushed as soon as it is written."""
import csv
import io
import os

from kd.checkpoint import atomic_write


class CSVLogger:
    """Appends epoch rows to a CSV file whose header is the keys of the first row.

    keep_epochs=k (on resume) first rewrites the file, atomically, with only the rows of epochs
    1..k, so a run killed after logging epoch k+1 but before checkpointing it gets no duplicate rows.
    """

    def __init__(self, path: str, keep_epochs: int = 0):
        self.path = path
        self.columns, rows = self._read(keep_epochs) if keep_epochs else (None, [])
        if self.columns is None:
            self.file = self.writer = None
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(path, lambda f: f.write(text.getvalue().encode()))
        self._open()

    def _read(self, keep_epochs: int) -> tuple[list[str] | None, list[dict]]:
        if not os.path.exists(self.path):
            return None, []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if int(row["epoch"]) <= keep_epochs]
            return reader.fieldnames, rows

    def _open(self) -> None:
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns)

    def log(self, row: dict) -> None:
        if self.writer is None:  # the first row of a new log
            self.columns = list(row)
            atomic_write(self.path, lambda f: f.write((",".join(self.columns) + "\n").encode()))
            self._open()
        self.writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
