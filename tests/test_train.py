"""Trainer and `pixelcnn train`: outputs, exact resume, DDP under torchrun, error handling, and the model benchmark.

Every model here is tiny (8 channels, 2 layers, 8x8 images) so the whole file runs in well under a minute on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import app.train
from app.bench.servers import free_port
from app.cli import main
from app.data import load_dataset
from app.evaluate import evaluate
from app.imaging import grid
from app.model import ModelConfig, load, sample_naive, save
from app.train import TrainOptions, train
from tests.helpers import TINY_MODEL_ARGS, tiny_model, torch_threads, write_tiny_npz

STEPS = 2 * (96 // 16)  # 2 epochs of 96 training images in batches of 16


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def read_metrics(model_dir: Path) -> dict:
    return json.loads((model_dir / "metrics.json").read_text())


def tensors_equal(a: Path, b: Path) -> None:
    """Every tensor of two safetensors files is bit-identical (same names, shapes, dtypes and values)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), f"{name} differs"


def check_trained(model_dir: Path, data: str, conditional: bool) -> ModelConfig:
    """The three files exist, metrics are sane, and the saved weights reproduce the reported test bits/dim."""
    for name in ("config.json", "model.safetensors", "metrics.json"):
        assert (model_dir / name).is_file(), name
    metrics = read_metrics(model_dir)
    assert 0 < metrics["test_bits_per_dim"] < 8  # below a uniform 256-way guess
    assert metrics["steps"] == STEPS
    assert metrics["images_seen"] == STEPS * 16
    assert metrics["processes"] == 1
    assert metrics["conditional_on_labels"] is conditional
    assert metrics["history"] and metrics["history"][-1]["step"] == STEPS
    for key in ("commit", "command", "torch", "hardware", "wall_time_s"):
        assert key in metrics, key
    assert metrics["commit"] and metrics["command"].startswith("pixelcnn")

    first, second = load(model_dir), load(model_dir)
    assert not first.training
    test_set = load_dataset(data, "test")
    labels = test_set.labels if conditional else None
    with torch.no_grad():
        logits = first(test_set.images, labels)
        assert torch.equal(logits, second(test_set.images, labels))
    assert logits.shape == (len(test_set), 256, *first.config.shape)
    result = evaluate(first, test_set)
    assert result.images == metrics["test_images"] == len(test_set)
    assert result.bits_per_dim == pytest.approx(metrics["test_bits_per_dim"], abs=1e-5)
    return first.config


def test_train_cli_gated(trained_model: Path, tiny_npz: Path) -> None:
    config = check_trained(trained_model, str(tiny_npz), conditional=False)
    assert config.arch == "gated" and config.hidden_channels == 8 and config.layers == 2
    assert config.head_channels == 16 and config.shape == (1, 8, 8) and config.num_classes == 0
    # The final checkpoint holds the same weights as the exported model.
    checkpoint = load_file(str(trained_model.parent / "ck" / app.train.CHECKPOINT_WEIGHTS))
    exported = load_file(str(trained_model / "model.safetensors"))
    assert {f"model.{k}" for k in exported} <= checkpoint.keys()
    for name, value in exported.items():
        assert torch.equal(checkpoint[f"model.{name}"], value), name
    assert any(k.startswith("optim.exp_avg_sq.") for k in checkpoint)


def test_train_cli_pixelcnn(tmp_path: Path, tiny_npz: Path) -> None:
    code = main(
        [
            "train",
            "--data",
            str(tiny_npz),
            "--arch",
            "pixelcnn",
            *TINY_MODEL_ARGS,
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 0
    config = check_trained(tmp_path / "m", str(tiny_npz), conditional=False)
    assert config.arch == "pixelcnn"


def write_class_folder(root: Path, per_class_train: int = 32, per_class_test: int = 8) -> Path:
    """train/ and test/ folders with one subfolder of 8x8 grayscale PNGs per class (3 classes, 96 train images)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:8, 0:8]
    patterns = {"checker": ((xx + yy) % 2) * 255, "columns": xx * 36, "rows": yy * 36}
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for name, pattern in patterns.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(pattern + rng.integers(-20, 21, size=(8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_train_cli_conditional(tmp_path: Path, arch: str) -> None:
    data = write_class_folder(tmp_path / "shapes")
    out = tmp_path / "m"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--arch",
            arch,
            "--conditional",
            *[arg for arg in TINY_MODEL_ARGS if arg != "--no-samples"],
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    config = check_trained(out, str(data), conditional=True)
    assert config.arch == arch
    # samples.png: one image per class with the run's seed (0), the reference sampler's images.
    expected = sample_naive(load(out), 3, torch.arange(3), seed=0)
    assert np.array_equal(np.array(Image.open(out / "samples.png")), grid(expected.images, columns=3)[0])
    assert config.num_classes == 3
    assert config.class_names == ["checker", "columns", "rows"]
    # The label is used: the same image gets different likelihoods under different classes.
    model = load(out)
    image = load_dataset(str(data), "test", limit=1).images.expand(3, -1, -1, -1)
    with torch.no_grad():
        logits = model(image, torch.arange(3))
    assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])


def test_train_cli_conditional_npz(tmp_path: Path, tiny_npz: Path) -> None:
    out = tmp_path / "m"
    code = main(
        [
            "train",
            "--data",
            str(tiny_npz),
            "--conditional",
            *TINY_MODEL_ARGS,
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    config = ModelConfig.load(out / "config.json")
    assert config.num_classes == 3 and len(config.class_names) == 3


def test_train_cli_records_its_command(trained_model: Path) -> None:
    command = read_metrics(trained_model)["command"]
    assert command.startswith("pixelcnn train --data ") and "--epochs 2" in command


# ---- exact resume -------------------------------------------------------------------------------------------

RESUME_CONFIG = ModelConfig(
    hidden_channels=8,
    layers=2,
    first_kernel_size=3,
    kernel_size=3,
    head_channels=16,
    height=8,
    width=8,
    num_classes=3,
    class_names=["a", "b", "c"],
)


def resume_options(data: Path, root: Path, resume: bool = False) -> TrainOptions:
    return TrainOptions(
        data=str(data),
        out=root / "m",
        checkpoint_dir=root / "ck",
        epochs=2,
        batch_size=16,
        eval_every=5,
        eval_limit=8,
        checkpoint_every=0,
        resume=resume,
        device="cpu",
        sample_grid=False,
    )


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, run folder) of 2 epochs trained without interruption."""
    root = tmp_path_factory.mktemp("straight")
    data = write_tiny_npz(root / "tiny.npz")
    with torch_threads(1):
        metrics = train(RESUME_CONFIG, resume_options(data, root))
    assert metrics["steps"] == STEPS
    return data, root


@pytest.mark.parametrize("stop_at", [4, 6, 9])  # mid-epoch 1, the epoch boundary, mid-epoch 2
def test_exact_resume(
    tmp_path: Path,
    straight_run: tuple[Path, Path],
    stop_at: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    data, straight = straight_run
    real_learning_rate = app.train.learning_rate

    def interrupting_learning_rate(step: int, total_steps: int, options: TrainOptions) -> float:
        if step == stop_at:  # called before step `stop_at` touches the model: steps 0..stop_at-1 are done
            raise KeyboardInterrupt
        return real_learning_rate(step, total_steps, options)

    monkeypatch.setattr(app.train, "learning_rate", interrupting_learning_rate)
    with pytest.raises(KeyboardInterrupt):
        train(RESUME_CONFIG, resume_options(data, tmp_path))
    monkeypatch.setattr(app.train, "learning_rate", real_learning_rate)

    state = json.loads((tmp_path / "ck" / app.train.TRAINER_STATE).read_text())
    assert state["step"] == stop_at
    assert not (tmp_path / "m" / "model.safetensors").exists()

    capsys.readouterr()
    metrics = train(RESUME_CONFIG, resume_options(data, tmp_path, resume=True))
    assert f"at step {stop_at}" in capsys.readouterr().out
    assert metrics["steps"] == STEPS and metrics["images_seen"] == STEPS * 16

    tensors_equal(straight / "m" / "model.safetensors", tmp_path / "m" / "model.safetensors")
    # Adam's moments and step counts too.
    tensors_equal(straight / "ck" / app.train.CHECKPOINT_WEIGHTS, tmp_path / "ck" / app.train.CHECKPOINT_WEIGHTS)
    assert metrics["test_nll_nats"] == read_metrics(straight / "m")["test_nll_nats"]


def test_resume_refuses_another_config(tmp_path: Path, straight_run: tuple[Path, Path]) -> None:
    data, straight = straight_run
    options = resume_options(data, straight, resume=True)
    options.out = tmp_path / "m"
    wider = dataclasses.replace(RESUME_CONFIG, hidden_channels=16, head_channels=32)
    with pytest.raises(SystemExit, match="another model config"):
        train(wider, options)


def test_resume_of_a_finished_run_trains_no_further(tmp_path: Path, straight_run: tuple[Path, Path]) -> None:
    data, straight = straight_run
    options = resume_options(data, straight, resume=True)
    options.out = tmp_path / "m"
    metrics = train(RESUME_CONFIG, options)
    assert metrics["steps"] == STEPS
    tensors_equal(straight / "m" / "model.safetensors", tmp_path / "m" / "model.safetensors")


# ---- DDP ----------------------------------------------------------------------------------------------------


def torchrun(launcher: list[str], train_args: list[str]) -> list[str]:
    """A torchrun command (launcher options, then `pixelcnn train` with one torch thread per process)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "-m",
        "app.cli",
        "train",
        *train_args,
        "--threads",
        "1",
    ]


def run_together(commands: list[list[str]], timeout: float = 180, check: bool = True) -> list[tuple[int, str]]:
    """Start every command at once (the nodes of one run wait for each other); (exit code, stderr) of each.
    check: require each to succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for command in commands
    ]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()  # only those still running after a timeout; a finished one ignores it
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0 or not check, stdout[-2000:] + stderr[-4000:]
    return [(process.returncode, stderr) for process, (_, stderr) in zip(processes, outputs)]


def ddp_train_args(data: Path, arch: str, root: Path) -> list[str]:
    return [
        "--data",
        str(data),
        "--arch",
        arch,
        *TINY_MODEL_ARGS,
        "--checkpoint-dir",
        str(root / "ck"),
        "--out",
        str(root / "m"),
    ]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path):
    """The model folder of one process trained on the same global batches, per arch (trained once)."""
    runs: dict[str, Path] = {}

    def run(arch: str) -> Path:
        if arch not in runs:
            root = tmp_path_factory.mktemp(f"single-{arch}")
            with torch_threads(1):
                assert main(["train", *ddp_train_args(tiny_npz, arch, root)]) == 0
            runs[arch] = root / "m"
        return runs[arch]

    return run


def check_matches_single_process(ddp: Path, single: Path) -> None:
    """A 2-process run trains the same model as one process: each rank takes half of the same global batch,
    and DDP averages the gradients, so only the order of floating-point sums differs (float32 roundings of
    ~1e-7 per step, which 12 Adam steps of lr 3e-3 leave far below 1e-4)."""
    metrics = read_metrics(ddp)
    assert metrics["processes"] == 2
    assert metrics["steps"] == STEPS and metrics["images_seen"] == STEPS * 16
    assert metrics["command"].startswith("pixelcnn train")
    single_weights = load_file(str(single / "model.safetensors"))
    ddp_weights = load_file(str(ddp / "model.safetensors"))
    assert single_weights.keys() == ddp_weights.keys()
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], rtol=0, atol=1e-4, msg=name)
    assert metrics["test_bits_per_dim"] == pytest.approx(read_metrics(single)["test_bits_per_dim"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_ddp_two_processes(tmp_path: Path, tiny_npz: Path, single_process_run, arch: str) -> None:
    """torchrun with 2 CPU (gloo) processes on one node."""
    run_together([torchrun(["--standalone", "--nproc_per_node=2"], ddp_train_args(tiny_npz, arch, tmp_path))])
    check_matches_single_process(tmp_path / "m", single_process_run(arch))


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_ddp_two_nodes(tmp_path: Path, tiny_npz: Path, single_process_run, rendezvous: str) -> None:
    """Two torchrun launchers of one process each, as the two nodes of a multi-node run (README, "Training past
    one machine"), meeting on loopback: through the c10d rendezvous (the same command on both nodes; the
    rendezvous hands out the ranks), and through the static form with a node rank each (what the Kubernetes
    Job in deploy/k8s/training does)."""
    port = free_port()

    def launcher(node_rank: int) -> list[str]:
        if rendezvous == "c10d":
            where = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-node-test"]
        else:
            where = [f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        return ["--nnodes=2", "--nproc-per-node=1", *where]

    train_args = ddp_train_args(tiny_npz, "gated", tmp_path)
    run_together([torchrun(launcher(node_rank), train_args) for node_rank in (0, 1)])
    check_matches_single_process(tmp_path / "m", single_process_run("gated"))


@pytest.mark.slow
def test_two_node_resume_stops_when_a_node_lacks_the_checkpoint(
    tmp_path: Path, tiny_npz: Path, single_process_run
) -> None:
    """--resume where node 1 does not see node 0's checkpoint folder (here: another path, as on a node without
    the shared volume): every process stops with the reason, none trains on alone."""
    shutil.copytree(single_process_run("gated").parent / "ck", tmp_path / "node0" / "ck")
    port = free_port()
    commands = [
        torchrun(
            [
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node_rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
            ],
            [*ddp_train_args(tiny_npz, "gated", tmp_path / f"node{node_rank}"), "--resume"],
        )
        for node_rank in (0, 1)
    ]
    results = run_together(commands, check=False)
    assert all(code != 0 for code, _ in results)
    assert f"rank 0: step {STEPS}, rank 1: step 0" in "".join(stderr for _, stderr in results)
    assert not (tmp_path / "node0" / "m").exists() and not (tmp_path / "node1" / "m").exists()


# ---- errors -------------------------------------------------------------------------------------------------


def test_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope"
    code = main(["train", "--data", "mnist", "--data-dir", str(missing), "--out", str(tmp_path / "m")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(missing) in err
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()


# ---- benchmark ----------------------------------------------------------------------------------------------


def test_bench_model_json(capsys: pytest.CaptureFixture) -> None:
    from app.bench.model import run

    assert run(["--sizes", "8x2", "--steps", "1", "--batch-size", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    keys = {"model", "channels", "layers", "params", "forward_images_per_s", "train_images_per_s", "threads", "torch"}
    assert keys <= row.keys()
    assert (row["channels"], row["layers"]) == (8, 2)
    assert row["params"] > 0 and row["forward_images_per_s"] > 0 and row["train_images_per_s"] > 0
    assert row["torch"] == torch.__version__ and row["threads"] == 1


def test_bench_sampling_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from app.bench.sampling import run
    from app.engine import c_library

    save(tiny_model("gated", 1, size=6, num_classes=3, seed=3).float(), tmp_path / "m")
    args = [
        str(tmp_path / "m"),
        "--batches",
        "1,2",
        "--naive-rows",
        "1",
        "--lanes",
        "1,2",
        "--concurrency",
        "3",
        "--repeats",
        "1",
    ]
    assert run([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["batch"] for row in result["sampling"]] == [1, 2]
    for row in result["sampling"]:
        assert row["naive_extrapolated"] and row["naive_rows_timed"] == 1
        assert min(row["naive_s"], row["cached_s"], row["torchscript_s"], row["eager_decoder_s"], row["forward_s"]) > 0
        assert row["native_kernel"] == (c_library._compiler() is not None)
    assert [row["lanes"] for row in result["engine"]] == [1, 2]
    assert all(row["concurrency"] == 3 and row["one_s"] > 0 and row["concurrent_s"] > 0 for row in result["engine"])
    native = c_library._compiler() is not None
    # Batch 1 as a 2-lane engine draws a lone request: by wavefront with the C kernel where two rows fit in
    # flight; these 6 columns hold one (rows start reach + group columns apart), so one lane, as the engine would.
    assert [row["cached_lanes"] for row in result["sampling"]] == [1, 1]
    assert all(row["one_lane_s"] > 0 for row in result["sampling"])
    # The roofline: multiply-adds per image counted by hand from the config (gated, 1 colour, n = 24 channels,
    # 3 layers, first kernel 5, later 3, head 24), and the measured peak.
    n, head, pixels = 24, 24, 6 * 6
    kernels = [(5, 1), (3, n), (3, n)]  # (kernel width, input channels) per layer
    vertical = sum((k // 2 + 1) * k * c_in * 2 * n + (2 * n) ** 2 for k, c_in in kernels)
    horizontal = sum((k // 2 + 1) * c_in * 2 * n for k, c_in in kernels) + 2 * n * 2 * n + n * n
    output = n * head + head * 256
    forward = sum((k // 2 + 1) * k * c_in * 2 * n + (k // 2 + 1) * c_in * 2 * n + (2 * n) ** 2 for k, c_in in kernels)
    forward += 3 * 2 * n * n + output  # residual and skip 1x1s of each layer, the head
    for row in result["sampling"]:
        assert row["cached_macs_per_image"] == pixels * (vertical + horizontal + output)
        assert row["forward_macs_per_image"] == pixels * forward
        assert row["one_lane_gflops"] > 0 and row["forward_gflops"] > 0
    if native:
        peak = result["peak"]
        assert peak["fma_gflops"] > 0 and peak["vector_floats"] >= 4
        for row in result["sampling"]:
            assert row["one_lane_of_fma_peak"] == round(row["one_lane_gflops"] / peak["fma_gflops"], 2) < 1
    assert run(args) == 0
    table = capsys.readouterr().out
    assert "cached/forward" in table and "torchscript/forward" in table and "concurrent/one" in table
    assert "roofline" in table and "GFLOP/s" in table
