"""The report layer: tables, their rendering, figures and model cards, built only from result files
(run.json, evaluation JSON, audit.json and the probe CSVs), with records linked to runs by run_id.

    tables.py         the registered tables (robustness, reference, cost, masking) and their inputs
    render.py         a table as CSV, Markdown, LaTeX, HTML and its report caption
    reference.py      published numbers and how ours compare with them
    plots.py          comparison figures across runs (`gmr plots`)
    audit_figures.py  the figures of one `gmr diagnose` folder
    style.py          what every figure shares (matplotlib set-up, saving, axes helpers)
    cards.py          RobustBench model cards (`gmr card`)
"""
