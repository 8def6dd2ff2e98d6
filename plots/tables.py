"""The results table: one markdown row per run or seed group, at the best and the last epoch."""
import math

from kd.metrics import at_chance, blown_up
from kd.models import model_name
from plots.groups import Group, group_records, selected_by
from plots.rundata import Run

METRIC_COLUMNS = [  # (header, run_record key, decimals); metrics on the test split
    ("best top-1", "best_top1", 2), ("last top-1", "last_top1", 2),
    ("best top-5", "best_top5", 2), ("last top-5", "last_top5", 2),
    ("best NLL", "best_loss", 3), ("last NLL", "last_loss", 3),
    ("best ECE %", "best_ece", 2), ("last ECE %", "last_ece", 2),
    ("best super top-1", "best_super_top1", 2), ("last super top-1", "last_super_top1", 2),
    ("best agree", "best_agree", 2), ("last agree", "last_agree", 2),
    ("train time (min)", "train_time_min", 1),
]
HEADER = ["run", "role", "method", "arch", "n", "seeds", "epochs", "best by", "best epoch",
          *(header for header, _, _ in METRIC_COLUMNS)]
COST_HEADER = ["params (M)", "MACs (M)"]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def number(mean: float, std: float, decimals: int) -> str:
    """'12.35', '12.35 ± 0.71' when std is known, '–' when the value was not logged."""
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{decimals}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{decimals}f}"


def joined(values: list[str]) -> str:
    """One value if all runs agree on it, else each run's value, in seed order."""
    return values[0] if len(set(values)) == 1 else ",".join(values)


def epochs_done(run: Run) -> str:
    done = int(run.summary["epochs"] if run.summary else run.log["epoch"].iloc[-1])
    planned = run.config.get("epochs")
    return f"{done}/{planned}" if planned else str(done)


def results_row(group: Group, costs: dict | None) -> list[str]:
    records = group_records(group)
    mean, std = records.mean(), records.std(ddof=1)  # the sample std; NaN for a single run
    runs, first = group.runs, group.runs[0]
    row = [group.label, first.role, first.method, first.arch, str(len(runs)),
           joined([str(r.config.get("seed", "?")) for r in runs]),
           joined([epochs_done(r) for r in runs]),
           joined([selected_by(r).removesuffix("_top1") for r in runs]),
           joined([str(int(epoch)) for epoch in records["best_epoch"]]),
           *(number(mean[key], std[key], decimals) for _, key, decimals in METRIC_COLUMNS)]
    if costs is not None:
        cost = costs.get(model_name(first.config))  # None: the config does not name the model
        row += [f"{cost['params'] / 1e6:.2f}", f"{cost['macs'] / 1e6:.1f}"] if cost else ["–"] * 2
    row.append(joined([status(run) for run in runs]))
    return row


def status(run: Run) -> str:
    """'done' or 'unfinished'; 'blown up' when the last epoch's test predictions are
    (kd.metrics.blown_up, from log.csv), and the epoch a blow-up the run recovered from began."""
    state = "done" if run.summary is not None else "unfinished"
    blown = [int(e) for e, nll in zip(run.log["epoch"], run.log["test_loss"]) if blown_up(nll)]
    if blown and blown[-1] == int(run.log["epoch"].iloc[-1]):
        return "blown up" + (" (unfinished)" if run.summary is None else "")
    return f"{state} (blew up at epoch {blown[0]}, recovered)" if blown else state


def test_images(run: Run) -> int:
    """The test split's size: from the run's logits, else CIFAR-100's 10,000."""
    return len(run.logits["labels"]) if run.logits else 10_000


def results_table(groups: list[Group], costs: dict | None) -> str:
    """costs: kd.models.model_name -> {'params', 'macs', ...}, or None to leave the cost columns
    out. A note follows when every run is at chance."""
    header = HEADER + (COST_HEADER if costs is not None else []) + ["status"]
    table = markdown(header, [results_row(group, costs) for group in groups])
    runs = [run for group in groups for run in group.runs]
    if all(at_chance(run.log["test_top1"].iloc[-1], test_images(run)) for run in runs):
        table += ("\n\n**Every run here is at chance**: its last test top-1 is within 3 standard "
                  "errors of guessing (1 %). None has learned anything yet, and no difference "
                  "between them means anything.")
    return table
