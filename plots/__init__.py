"""The results report on run folders; the entry point is plots/plot_runs.py (--help)."""
