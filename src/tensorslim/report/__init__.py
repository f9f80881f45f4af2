"""Tables and plots."""

from tensorslim.report.plots import plot_accuracy_vs_keep, plot_spectra
from tensorslim.report.tables import rich_table

__all__ = ["plot_accuracy_vs_keep", "plot_spectra", "rich_table"]
