# `make demo` and `make test` work on a fresh machine with only Python 3.10+:
# each creates .venv and installs the package into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= runs/demo
# Where torch comes from: auto = the CPU builds on Linux without nvidia-smi (when the PyTorch
# CPU index answers), PyPI's default otherwise; cpu or pypi to choose (scripts/install_torch.sh).
TORCH  ?= auto
# The accelerate options: the GPU config when CUDA is there; else the CPU one (bf16 autocast on
# CPUs that compute bf16 natively, fp32 with a note elsewhere), with one thread per physical core
# so that accelerate does not warn about choosing it.
ACCEL  = $(shell $(BIN)/python -c "import torch, psutil; print('--config_file accelerate_config.yaml' if torch.cuda.is_available() else f'--config_file configs/accelerate/cpu_bf16.yaml --num_cpu_threads_per_process {psutil.cpu_count(logical=False) or 1}')" 2>/dev/null)
# The demo's preset: `demo` on a CPU; `demo-gpu` (the same models, trained longer on bigger
# batches) when CUDA is there.
DEMO_PRESET = $(shell $(BIN)/python -c "import torch; print('demo-gpu' if torch.cuda.is_available() else 'demo')" 2>/dev/null)

.PHONY: install demo test test-slow lint gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	bash scripts/install_torch.sh $(BIN)/python $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The whole road on built-in synthetic faces: data -> autoencoder -> latent UNet -> pipeline ->
# 200 samples (the grid shows the first 64) -> how good they are, against 256 held-out faces
# drawn with another seed (never trained on), beside the score of training faces against them.
demo: install
	$(BIN)/ffhq-ldm synth --out $(DEMO)/faces --num 2000 --seed 0
	$(BIN)/ffhq-ldm synth --out $(DEMO)/held_out --num 256 --seed 1
	$(BIN)/accelerate launch $(ACCEL) training/train_vae.py \
		--preset $(DEMO_PRESET) --data $(DEMO)/faces --output-dir $(DEMO)/vae_run
	$(BIN)/accelerate launch $(ACCEL) training/train_unet.py \
		--preset $(DEMO_PRESET) --data $(DEMO)/faces --vae $(DEMO)/vae_run/vae \
		--output-dir $(DEMO)/unet_run
	$(BIN)/ffhq-ldm sample --model $(DEMO)/unet_run/pipeline --num 200 --seed 0 \
		--out $(DEMO)/samples --grid $(DEMO)/samples_grid.png
	$(BIN)/ffhq-ldm evaluate ref --data $(DEMO)/held_out --out $(DEMO)/held_out_ref.npz
	$(BIN)/ffhq-ldm evaluate calc --samples $(DEMO)/samples --ref $(DEMO)/held_out_ref.npz \
		--data $(DEMO)/faces --max-train 200 --interpolations 0 --out $(DEMO)/eval \
		> $(DEMO)/quality.txt
	@echo
	@sed 1d $(DEMO)/quality.txt
	@echo
	@echo "demo done:"
	@echo "  sample grid:      $(DEMO)/samples_grid.png"
	@echo "  quality:          $(DEMO)/quality.txt, $(DEMO)/eval/report.html"
	@echo "  pipeline folder:  $(DEMO)/unet_run/pipeline"
	@echo "  tensorboard:      $(BIN)/tensorboard --logdir $(DEMO)"

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Style and common bugs (rules in pyproject.toml), on the folders that follow them.
lint: install
	$(BIN)/ruff check .

# Wheels a GPU machine without network lacks, for scripts/gpu_check.sh: the same
# diffusers as here, for its Python 3.12.
gpu-wheels: install
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d .whl \
		diffusers==$$($(BIN)/python -c "import diffusers; print(diffusers.__version__)") \
		importlib_metadata lpips

clean:
	rm -rf $(VENV) runs
