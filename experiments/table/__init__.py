"""The parts of experiments/fmnist_table.py (the paper's Table 2 on the Fashion-MNIST teacher):

- rows: which rows the table has, the work folder that keeps every finished row, and the rows file beside a table;
- runs: the distillation runs behind the rows (their folders' stats, times, snapshots and dumps; running them);
- scoring: sampling and scoring images, and making each missing row of a work folder;
- report: the Markdown table and the paper's orderings judged on its rows;
- plots: quality against NFE, and the distillation curves.
"""
