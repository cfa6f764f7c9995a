"""Both trainers in two CPU processes through `accelerate launch`, compared with one process.

What must hold for data-parallel training to be correct, checked on the real scripts:
- every rank ends with the same weights (a rank that drifts trains a different model than the
  one rank 0 saves);
- the UNet trainer gives the same weights in 2 processes as in 1 process with
  `--gradient-accumulation 2` (same global batch): each sample's latent, noise and timestep are
  drawn from (seed, step, global index), so the process layout must not matter;
- the LR schedule advances once per optimizer step in every layout (diffusers issue 1957 is
  the counter-example), and a checkpoint written by one layout resumes in another;
- logs and previews are written once, by the main process.

Rank 1 never writes its weights, so the scripts run under a small harness (written below into
the test's temporary folder) that calls the script's own ``main(argv)`` unchanged and then
dumps this rank's parameters, buffers, EMA shadow and the batches its data loader yielded.
Each launch costs 10-30 s on a 2-core CPU.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

ACCEL = ROOT / "configs" / "accelerate"
COMMON = ["--preset", "tiny", "--log-with", "none", "--no-progress"]
# The tiny preset's UNet: batch 8 per process, 12 steps, checkpoints at 6 and 12. A warm-up
# longer than the run makes the LR differ at every step, so a miscounted schedule shows.
BASE_LR, WARMUP, STEPS = 1e-3, 20, 12
UNET_ARGS = ["--log-every", "1", "--warmup-steps", str(WARMUP)]

HARNESS = '''\
"""Run a training script's main() as launched, then write what this rank holds."""
import importlib.util
import os
import sys
from pathlib import Path

import accelerate
import accelerate.data_loader
import torch
from safetensors.torch import save_file

from ffhq_ldm.train import ema as train_ema

script, dump, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
modules, initial, emas, batches = [], [], [], []

# Record what the script gets back from accelerator.prepare (its DDP-wrapped models, and
# their weights at that moment) ...
_prepare = accelerate.Accelerator.prepare


def prepare(self, *objects, **kwargs):
    result = _prepare(self, *objects, **kwargs)
    items = result if isinstance(result, tuple) else (result,)
    for wrapped in items:
        if isinstance(wrapped, torch.nn.Module):
            inner = getattr(wrapped, "module", wrapped)
            initial.append({n: p.detach().cpu().contiguous().clone()
                            for n, p in inner.named_parameters()})
            modules.append(wrapped)
    return result


# ... every EMA it creates ...
_ema_init = train_ema.EMA.__init__


def ema_init(self, *args, **kwargs):
    _ema_init(self, *args, **kwargs)
    emas.append(self)


# ... and a fingerprint (mean pixel) of every image its prepared data loader hands it.
_iter = accelerate.data_loader.DataLoaderShard.__iter__


def iterate(self):
    for batch in _iter(self):
        # the images: the batch itself, or the first image-shaped tensor of a tuple
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        images = next(t for t in items if torch.is_tensor(t) and t.dim() == 4)
        batches.append(images.detach().double().flatten(1).mean(1).cpu())
        yield batch


accelerate.Accelerator.prepare = prepare
train_ema.EMA.__init__ = ema_init
accelerate.data_loader.DataLoaderShard.__iter__ = iterate

spec = importlib.util.spec_from_file_location("script_under_test", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
code = module.main(argv)

tensors = {}
for i, wrapped in enumerate(modules):
    inner = getattr(wrapped, "module", wrapped)
    for name, value in inner.named_parameters():
        tensors[f"param/{i}/{name}"] = value.detach().cpu().contiguous().clone()
    for name, value in inner.named_buffers():
        tensors[f"buffer/{i}/{name}"] = value.detach().cpu().contiguous().clone()
    for name, value in initial[i].items():
        tensors[f"initial/{i}/{name}"] = value
for i, ema in enumerate(emas):
    for name, value in zip(ema.names, ema.shadow):
        tensors[f"ema/{i}/{name}"] = value.detach().cpu().contiguous().clone()
if batches:
    tensors["batches"] = torch.stack(batches)
dump.mkdir(parents=True, exist_ok=True)
save_file(tensors, str(dump / f"rank{os.environ.get('RANK', '0')}.safetensors"))
sys.exit(code)
'''


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "ACCELERATE_MIXED_PRECISION")}
    # ACCELERATE_USE_CPU: see configs/accelerate/cpu_2proc.yaml, without it the two processes
    # would each run alone. One OpenMP thread per process on a 2-core machine.
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def launch(config: str, script: str, args: list, dump: Path, harness: Path, extra=()):
    """``accelerate launch --config_file CONFIG [extra] HARNESS training/SCRIPT DUMP ARGS``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCEL / config), *extra, str(harness), str(ROOT / "training" / script), str(dump),
           *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"launch failed ({process.returncode}):\n{out[-6000:]}"
    return out


def run(config, script, args, dump, harness, extra=()) -> str:
    return finish(launch(config, script, args, dump, harness, extra))


def ranks(dump: Path, n: int) -> list[dict]:
    return [load_file(str(dump / f"rank{r}.safetensors")) for r in range(n)]


def group(tensors: dict, prefix: str) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, "the two runs hold different (or no) tensors"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny autoencoder, then each layout's run once per module

@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    path = tmp_path_factory.mktemp("harness") / "dump_rank_state.py"
    path.write_text(HARNESS)
    return path


@pytest.fixture(scope="module")
def tiny_vae(faces32, tmp_path_factory):
    """An untrained tiny autoencoder export: stage 2 only needs a fixed encoder."""
    from ffhq_ldm.config import get_preset
    from ffhq_ldm.models.vae import build_vae
    from ffhq_ldm.train.export import export_vae

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_vae") / "vae"
    export_vae(build_vae(get_preset("tiny", "vae")), out, 1.0,
               {"holdout": 8, "split_seed": 0, "resolution": 32})
    return out


@pytest.fixture(scope="module")
def unet_runs(faces32, tiny_vae, harness, tmp_path_factory):
    """The same global batch (16) as 2 processes x 8, and as 1 process x 8 x 2 accumulation."""
    from ffhq_ldm.cli import main as ffhq_ldm

    root = tmp_path_factory.mktemp("unet_runs")
    # Both layouts read one latent cache, built first (as docs/training.md advises before a
    # multi-process run), so the two runs can go at once without racing to write it.
    assert ffhq_ldm(["cache-latents", "--vae", str(tiny_vae), "--data", str(faces32),
                     "--latent-cache", str(root / "cache"), "--num-workers", "0",
                     "--device", "cpu", "--no-progress"]) == 0

    def args(name, *more):
        return [*COMMON, "--data", faces32, "--vae", tiny_vae, "--output-dir", root / name,
                "--latent-cache", root / "cache", *UNET_ARGS, *more]

    two = launch("cpu_2proc.yaml", "train_unet.py", args("two"), root / "dump_two", harness)
    one = launch("cpu.yaml", "train_unet.py", args("one", "--gradient-accumulation", "2"),
                 root / "dump_one", harness)
    finish(two), finish(one)
    return root


# ---------------------------------------------------------------------------------------------
# UNet trainer

def test_unet_ranks_hold_identical_weights(unet_runs):
    out = unet_runs / "two"
    run_config = json.loads((out / "config.json").read_text())["run"]
    # A launch that silently fell back to 1 process per rank would say 1 here.
    assert run_config["num_processes"] == 2 and run_config["global_batch"] == 16
    rank0, rank1 = ranks(unet_runs / "dump_two", 2)
    assert group(rank0, "ema/"), "no train_ema.EMA was created"
    assert rank0.keys() == rank1.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"ranks differ in {different[:5]}"
    # Not a vacuous equality: training moved the weights.
    # (AdamW moves a weight by about the LR per step: 1e-3 x (2 + ... + 13) / 20 = 4.5e-3 at
    # most here, far above the 1e-5 the layouts are compared with below.)
    moved = max_abs_diff({k[len("param/"):]: v for k, v in group(rank0, "param/").items()},
                         {k[len("initial/"):]: v for k, v in group(rank0, "initial/").items()})
    assert moved > 1e-3


def test_unet_two_processes_equal_one_process_with_accumulation(unet_runs):
    two, = ranks(unet_runs / "dump_two", 1)
    one, = ranks(unet_runs / "dump_one", 1)
    weights = max_abs_diff(group(two, "param/"), group(one, "param/"))
    ema = max_abs_diff(group(two, "ema/"), group(one, "ema/"))
    # What each layout exported (main process only): the pipeline's EMA UNet.
    exported = [load_file(str(unet_runs / name / "pipeline" / "unet"
                              / "diffusion_pytorch_model.safetensors")) for name in ("two", "one")]
    export = max_abs_diff(*exported)
    print(f"max |2 processes - 1 process x 2 accumulation|: weights {weights:.3g}, "
          f"EMA {ema:.3g}, exported UNet {export:.3g}")
    assert weights <= 1e-5 and ema <= 1e-5 and export <= 1e-5


def test_lr_schedule_counts_optimizer_steps_in_every_layout(unet_runs):
    for name in ("two", "one"):
        out = unet_runs / name
        lines = log_lines(out)
        # Logged once (main process), every step exactly once.
        assert [line["step"] for line in lines] == list(range(1, STEPS + 1)), name
        for line in lines:
            k = line["step"]
            # After k optimizer steps the linear warm-up stands at (k + 1) / warmup.
            assert line["lr"] == pytest.approx(BASE_LR * min(1.0, (k + 1) / WARMUP), rel=1e-9)
            assert line["images_seen"] == 16 * k
        state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json")
                           .read_text())
        assert (state["step"], state["images_seen"]) == (STEPS, 16 * STEPS), name
    # Previews come from the main process only: one file per preview step.
    previews = sorted(p.name for p in (unet_runs / "two" / "previews").iterdir())
    assert previews == ["step-00000006.png", "step-00000012.png"]


def test_checkpoint_of_two_processes_resumes_in_one(unet_runs, faces32, tiny_vae, harness):
    """Stop the 2-process run at its step-6 checkpoint, finish it in 1 process x 2 accumulation."""
    out = unet_runs / "resumed"
    run("cpu.yaml", "train_unet.py",
        [*COMMON, "--data", faces32, "--vae", tiny_vae, "--output-dir", out,
         "--latent-cache", unet_runs / "cache", *UNET_ARGS, "--gradient-accumulation", "2",
         "--resume", unet_runs / "two" / "checkpoints" / "step-00000006"],
        unet_runs / "dump_resumed", harness)
    two, = ranks(unet_runs / "dump_two", 1)
    resumed, = ranks(unet_runs / "dump_resumed", 1)
    difference = max_abs_diff(group(two, "param/") | group(two, "ema/"),
                              group(resumed, "param/") | group(resumed, "ema/"))
    print(f"max |uninterrupted - resumed in another layout|: {difference:.3g}")
    assert difference <= 1e-5
    assert [line["step"] for line in log_lines(out)] == list(range(7, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# VAE trainer

def test_vae_two_processes(faces32, harness, tmp_path):
    """Identical weights on both ranks, each rank its own images, the global batch counted."""
    out, dump = tmp_path / "vae", tmp_path / "dump"
    # The discriminator starts halfway (the tiny preset never starts it), so the adversarial
    # path runs under DDP too. 40 training images / global batch 16 = 2 steps per epoch.
    steps = 8
    run("cpu_2proc.yaml", "train_vae.py",
        [*COMMON, "--data", faces32, "--output-dir", out, "--max-steps", steps,
         "--disc-start", 4, "--eval-every", steps, "--checkpoint-every", 4, "--no-rfid",
         # the DataLoader path, whose batches the harness records (the decoded-image cache
         # splits its batches between processes without a DataLoader)
         "--image-cache", "off"], dump,
        harness)  # rFID under 2 processes: the slow test with --rfid-every-eval
    assert json.loads((out / "config.json").read_text())["run"]["num_processes"] == 2
    rank0, rank1 = ranks(dump, 2)

    # Parameters (autoencoder and discriminator) are bit-identical. The PatchGAN's BatchNorm
    # running statistics are not: DDP broadcasts rank 0's buffers at each forward and each rank
    # then updates them from its own images. They are used only in eval mode, never in training,
    # and the checkpoint holds rank 0's.
    params = group(rank0, "param/")
    assert params.keys() == group(rank1, "param/").keys() and len(params) > 10
    different = [k for k in params if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"ranks differ in {different[:5]}"
    buffers = [k for k in group(rank0, "buffer/") if not torch.equal(rank0[k], rank1[k])]
    assert all(k.startswith("buffer/1/") and "running_" in k for k in buffers), buffers

    # Each rank trained on 8 images per step, different from the other rank's; over an epoch
    # (2 steps) no image came twice: the data were split, not duplicated.
    seen0, seen1 = rank0["batches"], rank1["batches"]
    assert seen0.shape == seen1.shape == (steps, 8)
    for epoch in range(steps // 2):
        images = torch.cat([seen0[2 * epoch:2 * epoch + 2], seen1[2 * epoch:2 * epoch + 2]])
        assert images.flatten().unique().numel() == 32, f"an image repeats in epoch {epoch}"
    lines = log_lines(out)
    assert [line["images_seen"] for line in lines] == [16 * line["step"] for line in lines]
    state = json.loads((out / "checkpoints" / f"step-{steps:08d}" / "trainer_state.json")
                       .read_text())
    assert (state["step"], state["images_seen"]) == (steps, 16 * steps)
    assert "loss/disc" in lines[-1], "the discriminator never ran"
    assert (out / "vae" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# The example configs

def test_example_accelerate_configs_load():
    """Every file in configs/accelerate is a config accelerate 1.x accepts, as documented."""
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = {p.name: load_config_from_file(str(p)) for p in sorted(ACCEL.glob("*.yaml"))}
    assert {"cpu.yaml", "cpu_2proc.yaml", "multi_gpu.yaml", "multi_node.yaml",
            "deepspeed_zero2.yaml"} <= loaded.keys()
    assert loaded["cpu_2proc.yaml"].num_processes == 2
    assert loaded["multi_gpu.yaml"].mixed_precision == "bf16"
    node = loaded["multi_node.yaml"]
    assert node.num_machines == 2 and node.num_processes % node.num_machines == 0
    assert node.main_process_ip and node.main_process_port
    ds = loaded["deepspeed_zero2.yaml"]
    ds_file = ROOT / ds.deepspeed_config["deepspeed_config_file"]
    ds_json = json.loads(ds_file.read_text())
    assert ds_json["zero_optimization"]["stage"] == 2
    # No data loader goes through accelerator.prepare in train_unet.py, so accelerate cannot
    # fill in a micro-batch of "auto": it must be a number (see the file's comments).
    assert isinstance(ds_json["train_micro_batch_size_per_gpu"], int)
    assert ds_json["gradient_accumulation_steps"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gpu_configs_launch_the_same_run_on_cpu(unet_runs, faces32, tiny_vae, harness):
    """multi_gpu.yaml and multi_node.yaml as written, on CPU processes (about 40 s).

    Only what a CPU cannot do is overridden: 2 processes, fp32, and for multi_node.yaml the
    address of "machine 0" (two launches on localhost, one process each). Both must give the
    2-process run's weights.
    """
    def args(name):
        return [*COMMON, "--data", faces32, "--vae", tiny_vae, "--output-dir", unet_runs / name,
                "--latent-cache", unet_runs / "cache", *UNET_ARGS]

    single, = ranks(unet_runs / "dump_two", 1)

    run("multi_gpu.yaml", "train_unet.py", args("multi_gpu"), unet_runs / "dump_multi_gpu",
        harness, extra=["--num_processes", "2", "--mixed_precision", "no"])
    gpu = ranks(unet_runs / "dump_multi_gpu", 2)

    port = _free_port()
    procs = [launch("multi_node.yaml", "train_unet.py", args("two_nodes"), unet_runs / "dump_nodes",
                    harness, extra=["--machine_rank", str(rank), "--num_processes", "2",
                                    "--main_process_ip", "127.0.0.1",
                                    "--main_process_port", str(port), "--mixed_precision", "no"])
             for rank in (0, 1)]
    for process in procs:
        finish(process)
    nodes = ranks(unet_runs / "dump_nodes", 2)

    for out, pair in (("multi_gpu", gpu), ("two_nodes", nodes)):
        assert json.loads((unet_runs / out / "config.json").read_text())["run"][
            "num_processes"] == 2, out
        assert max_abs_diff(pair[0], pair[1]) == 0.0, out
        assert max_abs_diff(group(pair[0], "param/"), group(single, "param/")) <= 1e-5, out
