"""Gradient-masking diagnostics (`gmr diagnose`).

    probes.py   one registered function per probe, each returning its table (one CSV); the shared
                per-batch work on a context; the trainer's per-epoch probes
    rules.py    the rules as data (threshold, direction, role, source, where the value comes from),
                the checks built by looping over them, and the verdict
    audit.py    the configuration, `diagnose`, `reaudit`, and `write_audit` (what the CLI calls)

Adding a probe is one `register_probe` function plus one `register_rule` rule (README, "Adding a
probe"). Nothing is imported here, so the trainer's import of `probes` stays light.
"""
