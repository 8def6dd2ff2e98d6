"""The distillation methods distill_student.py trains with, one module each: kd/methods/<name>.py
holds the method's formula (its docstring, with the paper and the reference code it follows),
its loss (a pure function), its connector when it reads features, its flags, and its entry
METHOD (kd.methods.common.Method). This registry lists them; distill_student.py, study.py, the
bench and the report ask it and never name a method.

A new method is a module here and its name in NAMES.
"""
import argparse
import functools
import importlib

from kd.methods.common import SHARED_FLAGS, Method

NAMES = ("kd", "dkd", "dist", "fitnet", "crd", "reviewkd", "at", "pkt", "rkd", "sp", "nst", "cc",
         "vid", "ofd", "kdsvd", "ab", "ft", "fsp", "wttm",
         "itrd", "sdd", "mlkd", "ctkd")  # --method's choices, in this order
METHODS: dict[str, Method] = {name: importlib.import_module(f"kd.methods.{name}").METHOD
                              for name in NAMES}
DEFAULT = NAMES[0]
METHOD_FLAGS = {name: method.flags for name, method in METHODS.items()}  # what each reads


def summary(name: str) -> str:
    """The method's paper: its docstring up to the first ';'."""
    doc = importlib.import_module(f"kd.methods.{name}").__doc__
    return " ".join(doc.split(";")[0].split())


def readers(flag: str) -> list[str]:
    """The methods that read a flag (none: it is not a method's flag)."""
    return [name for name, method in METHODS.items() if flag in method.flags]


def add_flags(p: argparse.ArgumentParser) -> None:
    """--method, the flags several methods share, then each method's own."""
    p.add_argument("--method", choices=list(METHODS), default=DEFAULT,
                   help="the distillation loss (kd/methods/<name>.py); a flag that the method "
                        "does not read is refused")
    for flag, (kwargs, what) in SHARED_FLAGS.items():
        p.add_argument(f"--{flag}", **kwargs, help=f"{', '.join(readers(flag))}: {what}")
    for method in METHODS.values():
        method.add_flags(p)


def flag_defaults() -> dict:
    """Every method flag's default, and --method's."""
    return dict(_flag_defaults())


@functools.cache
def _flag_defaults() -> dict:
    p = argparse.ArgumentParser()
    add_flags(p)
    return vars(p.parse_args([]))
