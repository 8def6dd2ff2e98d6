"""The run folder as a run writes it (kd.train.fit's Record): config.json, log.csv, the
checkpoints and their logits, summary.json, and the progress last.pt holds."""
import argparse
import json
import os
import time

from kd.checkpoint import save_checkpoint, write_json
from kd.errors import say
from kd.logger import CSVLogger
from kd.metrics import BLOWN_UP_FACTOR, blown_up
from kd.rundir import reset_out_dir

TIMING_COLUMNS = ("epoch_time_s", "train_img_per_s")  # log.csv's last: wall-clock time


class Record:
    """The run folder as the run writes it (config.json, log.csv, the checkpoints, summary.json;
    rank 0 only) and the progress last.pt holds: epochs done, the best and the last epoch's
    metrics, the wall time so far (training, evaluation and checkpoint writes)."""

    def __init__(self, args: argparse.Namespace, config: dict, is_main: bool):
        self.args, self.config, self.is_main = args, config, is_main
        self.select = "val_top1" if args.val_size else "test_top1"  # what picks best.pt
        self.epoch, self.best, self.last, self.elapsed_s = 0, {self.select: -1.0}, {}, 0.0
        self.blown_up: list[int] = []  # epochs whose test predictions blew up (kd.metrics)
        self.saved_epoch = 0  # the epoch last.pt holds
        self.init: dict = {}  # the init stage's progress: its epoch and optimizer (InitStage)
        self.logger, self.clock = None, None  # the clock runs from begin()

    def path(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)

    def say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def begin(self) -> None:
        """Make the folder ready (rank 0): the old run's files gone with --overwrite, config.json
        written, log.csv kept up to the saved epoch."""
        self.clock = time.perf_counter()
        if self.is_main:
            reset_out_dir(self.args)
            write_json(self.path("config.json"), self.config)
            self.logger = CSVLogger(self.path("log.csv"), keep_epochs=self.epoch)

    def end_epoch(self, row: dict, state: dict, logits_blob: dict | None) -> None:
        """Log the epoch's row (training stats, then the evaluation columns test_*, val_*) and
        write its checkpoints: best.pt and logits_best.pt when it is the best yet, last.pt and
        logits_last.pt every --save_every epochs and at the end."""
        row = {**{k: v for k, v in row.items() if k not in TIMING_COLUMNS},
               **{k: row[k] for k in TIMING_COLUMNS}}
        metrics = {k: v for k, v in row.items() if k.startswith(("test_", "val_"))}
        self.epoch, self.last = row["epoch"], {"epoch": row["epoch"], **metrics}
        self.elapsed_s += time.perf_counter() - self.clock  # with the last epoch's writes
        self.clock = time.perf_counter()
        is_best = row[self.select] > self.best[self.select]
        if is_best:
            self.best = self.last
        save_last = self.epoch % self.args.save_every == 0 or self.epoch == self.args.epochs
        self.saved_epoch = self.epoch if save_last else self.saved_epoch
        if blown_up(row["test_loss"]):
            self.blown_up.append(self.epoch)
            say(f"warning: epoch {self.epoch}: the test NLL is {row['test_loss']:.3g}, over "
                f"{BLOWN_UP_FACTOR}x a uniform prediction's: the run has blown up (a lower --lr "
                f"or a longer --warmup_epochs may help)")
        if not self.is_main:
            return
        self.logger.log(row)
        ckpt = {**state, "config": self.config, **self.progress()}
        # best before last: a crash in between redoes this epoch on resume and rewrites both;
        # a feature method's connector is needed to resume only, so last.pt alone holds it
        best = {k: v for k, v in ckpt.items() if k != "connector"}
        for suffix, state in (("best", best),) * is_best + (("last", ckpt),) * save_last:
            save_checkpoint(self.path(f"logits_{suffix}.pt"), logits_blob)
            save_checkpoint(self.path(f"{suffix}.pt"), state)
        val = f"val_top1 {row['val_top1']:.2f}  " if self.args.val_size else ""
        print(f"epoch {self.epoch}/{self.args.epochs}  train_loss {row['train_loss']:.4f}  "
              f"{val}test_top1 {row['test_top1']:.2f}  {row['train_img_per_s']:.0f} img/s",
              flush=True)

    def save_init(self, row: dict, state: dict, logger: CSVLogger | None) -> None:
        """An init epoch's row in init_log.csv and last.pt (rank 0)."""
        if not self.is_main:
            return
        logger.log(row)
        self.elapsed_s += time.perf_counter() - self.clock  # last.pt's wall time includes it
        self.clock = time.perf_counter()
        save_checkpoint(self.path("last.pt"), {**state, "config": self.config, **self.progress(),
                                               "init": self.init})
        print(f"init epoch {row['epoch']}/{self.args.init_epochs}  init_loss "
              f"{row['init_loss']:.4f}", flush=True)

    def progress(self) -> dict:
        return {"epoch": self.epoch, "best": self.best, "last": self.last,
                "elapsed_s": self.elapsed_s, "blown_up": self.blown_up}

    def finished(self) -> dict:
        """For a run resumed after its last epoch: the summary.json it wrote, as it wrote it, or
        where there is none (it stopped between its last last.pt and its summary) finish()'s."""
        if self.is_main and os.path.exists(self.path("summary.json")):
            with open(self.path("summary.json")) as f:
                return json.load(f)
        return self.finish()

    def finish(self) -> dict:
        """summary.json (rank 0) with the last checkpoint writes timed (when the run trained);
        the summary, or on other ranks the progress."""
        if self.clock is not None:
            self.elapsed_s += time.perf_counter() - self.clock
        if not self.is_main:
            return self.progress()
        return write_summary(self.path("summary.json"), self.progress(), self.select, self.config)


def logits_record(logits: dict, loaders: dict, epoch: int, teacher_logits: dict) -> dict:
    """Evaluation logits (float32, CPU: they reproduce the logged metrics) with the labels, so
    any metric can be recomputed later without a GPU."""
    blob = {"epoch": epoch}
    for name, loader in loaders.items():
        blob[name] = {"logits": logits[name].cpu(), "labels": loader.split.labels.cpu(),
                      "coarse_labels": loader.split.coarse_labels.cpu()}
        if name in teacher_logits:
            blob[name]["teacher_logits"] = teacher_logits[name].cpu()
    return blob


def write_summary(path: str, state: dict, select: str, config: dict) -> dict:
    best, last = state["best"], state["last"]
    teacher = {k: config[k] for k in ("teacher_logits", "teacher_cache_sha256") if k in config}
    blown = state.get("blown_up", [])
    status = "blown up" if state["epoch"] in blown else "done"
    summary = {"status": status, "blown_up_epochs": blown, "selected_by": select, **teacher,
               "best_epoch": best["epoch"],
               "best_test_top1": best["test_top1"], "best_test_top5": best["test_top5"],
               "last_test_top1": last["test_top1"], "last_test_top5": last["test_top5"],
               "epochs": state["epoch"], "total_time_s": state["elapsed_s"],
               "best": best, "last": last}
    write_json(path, summary)
    return summary
