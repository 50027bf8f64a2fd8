"""What a finished sweep says: paired bootstrap statistics, plots and the report document.

Pure functions of a sweep's results table and its per-query ranks (numpy, matplotlib, Optuna);
no Ray and no MLflow, so a report is built and tested without either. Reading those inputs from
a sweep directory or an MLflow store, and writing the report, is :mod:`clipray.sweep.report`.
"""
