"""The report layer: tables, their rendering, figures and model cards, built only from result files
(run.json, evaluation JSON, audit.json and the probe CSVs)."""
