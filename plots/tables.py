"""The results tables: one markdown row per run or seed group, at the best and the last epoch;
accuracy first, then calibration, mistakes, agreement and cost, so that neither is too wide."""
import math

from kd.metrics import at_chance, blown_up
from kd.methods import flag_defaults
from kd.models import model_name
from kd.rundir import settings
from plots.groups import Group, group_records, selected_by
from plots.rundata import Run

ACCURACY_COLUMNS = [  # (header, run_record key, decimals); metrics on the test split
    ("best top-1", "best_top1", 2), ("last top-1", "last_top1", 2),
    ("best top-5", "best_top5", 2), ("last top-5", "last_top5", 2),
    ("train time (min)", "train_time_min", 1),
]
CALIBRATION_COLUMNS = [
    ("best NLL", "best_loss", 3), ("last NLL", "last_loss", 3),
    ("best ECE %", "best_ece", 2), ("last ECE %", "last_ece", 2),
    ("best super top-1", "best_super_top1", 2), ("last super top-1", "last_super_top1", 2),
    ("best agree", "best_agree", 2), ("last agree", "last_agree", 2),
]
HEADER = ["run", "role", "method", "settings", "n", "seeds", "epochs", "best by", "best epoch",
          *(header for header, _, _ in ACCURACY_COLUMNS), "status"]
CALIBRATION_HEADER = ["run", "arch", *(header for header, _, _ in CALIBRATION_COLUMNS)]
COST_HEADER = ["params (M)", "MACs (M)"]
NOT_SHOWN = {"seed", "method", "arch",  # columns of their own, or the rows' seeds
             "teacher_cache_sha256"}  # teacher_logits=cache says it
# A method's own settings: compared between runs of the same method only
METHOD_SETTINGS = set(flag_defaults()) - {"method"}


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


def results_rows(group: Group, costs: dict | None, shown: str) -> tuple[list[str], list[str]]:
    """The group's row of each table; shown: its settings that differ from other runs'."""
    records = group_records(group)
    mean, std = records.mean(), records.std(ddof=1)  # the sample std; NaN for a single run
    runs, first = group.runs, group.runs[0]
    accuracy = [group.label, first.role, first.method, shown, str(len(runs)),
                joined([str(r.config.get("seed", "?")) for r in runs]),
                joined([epochs_done(r) for r in runs]),
                joined([selected_by(r).removesuffix("_top1") for r in runs]),
                joined([str(int(epoch)) for epoch in records["best_epoch"]]),
                *(number(mean[key], std[key], decimals) for _, key, decimals in ACCURACY_COLUMNS),
                joined([status(run) for run in runs])]
    calibration = [group.label, first.arch, *(number(mean[key], std[key], decimals)
                                              for _, key, decimals in CALIBRATION_COLUMNS)]
    if costs is not None:
        cost = costs.get(model_name(first.config))  # None: the config does not name the model
        calibration += [f"{cost['params'] / 1e6:.2f}", f"{cost['macs'] / 1e6:.1f}"] if cost \
            else ["–"] * 2
    return accuracy, calibration


def value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text[:12] + "…" if len(text) > 13 else text


def differing_settings(groups: list[Group]) -> list[str]:
    """For each group, 'key=value' of the settings (kd.rundir.settings) in which the groups of
    its kind (teachers, students) differ, among those that have the setting, a method's own
    settings among the groups of its method; '–' when none."""
    computed = {id(g.runs[0]): settings(g.runs[0].config) for g in groups}  # once per group
    shown = []
    for group in groups:
        first = group.runs[0]
        kind = [g.runs[0] for g in groups if g.runs[0].is_teacher == first.is_teacher]
        same_method = [run for run in kind if run.method == first.method]
        ours = computed[id(first)]
        varying = []
        for key in sorted(set(ours) - NOT_SHOWN):
            others = same_method if key in METHOD_SETTINGS else kind
            values = {repr(computed[id(run)][key]) for run in others if key in computed[id(run)]}
            if len(values) > 1:
                varying.append(key)
        shown.append(", ".join(f"{k}={value_text(ours[k])}" for k in varying) or "–")
    return shown


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
    """The accuracy table, then the calibration (and cost) table. costs: kd.models.model_name ->
    {'params', 'macs', ...}, or None to leave the cost columns out. A note follows when every
    run is at chance."""
    rows = [results_rows(group, costs, shown)
            for group, shown in zip(groups, differing_settings(groups))]
    calibration_header = CALIBRATION_HEADER + (COST_HEADER if costs is not None else [])
    table = markdown(HEADER, [accuracy for accuracy, _ in rows]) + "\n\n" + \
        markdown(calibration_header, [calibration for _, calibration in rows])
    runs = [run for group in groups for run in group.runs]
    if all(at_chance(run.log["test_top1"].iloc[-1], test_images(run)) for run in runs):
        table += ("\n\n**Every run here is at chance**: its last test top-1 is within 3 standard "
                  "errors of guessing (1 %). None has learned anything yet, and no difference "
                  "between them means anything.")
    return table
