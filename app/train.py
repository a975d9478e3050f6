"""`pixelcnn train`: train a PixelCNN, resumable exactly, single process or DDP under torchrun.

Exact resume: the batch order of epoch e is randperm(seed + e), the learning rate is a pure function of
the step, and a checkpoint holds the weights, Adam's moments, the weights' moving average (with --ema) and
the position in the epoch, so an interrupted run continues with the very batches and updates it would have
made.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from app.data import ImageDataset, load_dataset
from app.evaluate import check_dataset, evaluate
from app.model import ModelConfig, build, pick_device, save
from app.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from app.model.likelihood import nll_per_subpixel
from app.train_options import TrainOptions

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_WEIGHTS = "checkpoint.safetensors"


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app"], cwd=here, capture_output=True, text=True)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def learning_rate(step: int, total_steps: int, options: TrainOptions) -> float:
    """Linear warmup, then cosine decay to zero at the last step."""
    warmup = min(options.warmup_steps, total_steps // 10)
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return options.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Distributed:
    """Rank and world size; one process without torchrun."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def require_same_start(self, step: int, checkpoint_dir: Path) -> None:
        """On --resume, every process must start at the same step. A node that does not see rank 0's
        checkpoint folder (not on shared storage) would start over while the others resume: the processes
        would then train on different batches with different Adam states and wait for each other at the
        end. Stop all of them with the reason instead."""
        if self.world == 1:
            return
        steps: list[int | None] = [None] * self.world
        dist.all_gather_object(steps, step)
        if len(set(steps)) > 1:
            by_rank = ", ".join(f"rank {rank}: step {start}" for rank, start in enumerate(steps))
            raise SystemExit(
                f"--resume: the processes would start at different steps ({by_rank}); every node "
                f"must see the same checkpoint folder {checkpoint_dir} (shared storage)"
            )

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


class WeightAverage:
    """Exponential moving average of the weights (Polyak averaging, as PixelCNN++ evaluates): after each
    optimizer step, average = decay * average + (1 - decay) * weights. The averaged model is what gets
    evaluated and shipped; it is smoother than the last step's weights, which still carry the noise of the
    last few hundred batches. Kept in float32 beside the model, on its device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must be between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, average: WeightAverage | None = None
) -> None:
    """Weights, their average and Adam moments in safetensors, counters in JSON; written to temp names,
    then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.state_dict().items()})
    names = {p: n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state[p].items():
                tensors[f"optim.{key}.{names[p]}"] = value.detach().cpu().reshape(value.shape).contiguous()
    save_file(tensors, str(folder / (CHECKPOINT_WEIGHTS + ".tmp")))
    (folder / (TRAINER_STATE + ".tmp")).write_text(json.dumps(state, indent=2))
    os.replace(folder / (CHECKPOINT_WEIGHTS + ".tmp"), folder / CHECKPOINT_WEIGHTS)
    os.replace(folder / (TRAINER_STATE + ".tmp"), folder / TRAINER_STATE)


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, average: WeightAverage | None = None
) -> dict:
    tensors = load_file(str(folder / CHECKPOINT_WEIGHTS))
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        averaged = {k[len("ema.") :]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        if not averaged:
            raise SystemExit(f"--resume with --ema: the checkpoint in {folder} was written without --ema")
        average.load_state_dict(averaged)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, state_key, name = key.split(".", 2)  # optim.<Adam state key, no dots>.<parameter name>
            optimizer.state[params[name]][state_key] = value.to(device)
    return json.loads((folder / TRAINER_STATE).read_text())


def train(config: ModelConfig, options: TrainOptions) -> dict:
    device = pick_device(options.device)
    ranks = Distributed(device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)

    train_set = load_dataset(options.data, "train", options.data_dir, options.limit)
    test_set = load_dataset(options.data, "test", options.data_dir, options.final_eval_limit)
    check_dataset(config, train_set)  # before any training work: a mismatch is the user's to fix

    torch.manual_seed(options.seed)
    model = build(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    checkpoint_dir = options.checkpoint_dir or default_checkpoint_dir(options.out)
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "wall_time_s": 0.0, "images_seen": 0, "history": []}
    if options.resume and (checkpoint_dir / TRAINER_STATE).is_file():
        saved_config = ModelConfig.load(checkpoint_dir / "config.json")
        if saved_config != config:
            raise SystemExit(f"--resume: the checkpoint in {checkpoint_dir} was trained with another model config")
        average = WeightAverage(model, options.ema) if options.ema else None
        state = load_checkpoint(checkpoint_dir, model, optimizer, average)
        if ranks.main:
            print(f"resuming from {checkpoint_dir} at step {state['step']} (epoch {state['epoch']})")
    else:
        if options.init_from is not None:
            warm_start(model, config, options.init_from)
        average = WeightAverage(model, options.ema) if options.ema else None  # starts at the initial weights
        if ranks.main:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            config.save(checkpoint_dir / "config.json")
    if options.resume:
        ranks.require_same_start(state["step"], checkpoint_dir)
    # static_graph: the gated model's last `residual` conv never reaches the loss (only its skip output is used);
    # without it DDP waits for that parameter's gradient and fails at the second step.
    ddp_model = nn.parallel.DistributedDataParallel(model, static_graph=True) if ranks.world > 1 else model

    per_rank_batch = max(1, options.batch_size // ranks.world)
    steps_per_epoch = len(train_set) // (per_rank_batch * ranks.world)
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {options.batch_size} is larger than the {len(train_set)} training images")
    total_steps = max(1, round(options.epochs * steps_per_epoch))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(options.precision, device))

    interactive = sys.stderr.isatty()  # in a log file, a progress line every 30 s instead of 10 a second
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        disable=not ranks.main,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.1 if interactive else 30,
    )
    started = time.perf_counter() - state["wall_time_s"]
    last_checkpoint = time.perf_counter()
    window_images, window_start, running_bpd = 0, time.perf_counter(), None
    model.train()
    while state["step"] < total_steps:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(options.seed + state["epoch"]))
        for batch_index in range(state["step_in_epoch"], steps_per_epoch):
            if state["step"] >= total_steps:
                break
            start = batch_index * per_rank_batch * ranks.world + ranks.rank * per_rank_batch
            index = order[start : start + per_rank_batch]
            images = train_set.images[index].to(device, non_blocking=True)
            labels = train_set.labels[index].to(device) if config.conditional else None

            lr = learning_rate(state["step"], total_steps, options)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                logits = ddp_model(images, labels)
            loss = nll_per_subpixel(logits, images).mean()  # nats per sub-pixel
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            optimizer.step()
            if average is not None:
                average.update(model)

            state["step"] += 1
            state["step_in_epoch"] = batch_index + 1
            state["images_seen"] += per_rank_batch * ranks.world
            window_images += per_rank_batch * ranks.world
            bpd = loss.item() / math.log(2)
            running_bpd = bpd if running_bpd is None else 0.98 * running_bpd + 0.02 * bpd
            if ranks.main:
                elapsed = time.perf_counter() - window_start
                bar.set_postfix(
                    bpd=f"{running_bpd:.3f}", img_s=f"{window_images / elapsed:.0f}", lr=f"{lr:.1e}", refresh=False
                )
                bar.update(1)
                if elapsed > 30:
                    window_images, window_start = 0, time.perf_counter()

            periodic_eval = state["step"] % options.eval_every == 0 or state["step"] == total_steps
            if periodic_eval and ranks.main:
                quick = evaluate(served(model, average), subset(test_set, options.eval_limit))
                state["history"].append(
                    {
                        "step": state["step"],
                        "epoch": round(state["step"] / steps_per_epoch, 4),
                        "wall_time_s": round(time.perf_counter() - started, 1),
                        "train_bits_per_dim": round(running_bpd, 4),
                        "test_bits_per_dim": round(quick.bits_per_dim, 4),
                        "test_images": quick.images,
                    }
                )
                bar.write(
                    f"step {state['step']}: train {running_bpd:.4f} bits/dim, test {quick.bits_per_dim:.4f} "
                    f"bits/dim ({quick.images} images)"
                )
            if ranks.main and (time.perf_counter() - last_checkpoint > options.checkpoint_every or periodic_eval):
                state["wall_time_s"] = time.perf_counter() - started
                save_checkpoint(checkpoint_dir, model, optimizer, state, average)
                last_checkpoint = time.perf_counter()
        else:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
    bar.close()
    state["wall_time_s"] = time.perf_counter() - started

    metrics: dict = {}
    if ranks.main:
        save_checkpoint(checkpoint_dir, model, optimizer, state, average)
        shipped = served(model, average)
        final = evaluate(shipped, test_set)
        print(
            f"test: {final.nll_nats:.2f} nats/image, {final.bits_per_dim:.4f} bits/dim on {final.images} images"
            + (f" (weights averaged with decay {options.ema})" if average else "")
        )
        shipped.eval()
        save(shipped, options.out)
        metrics = {
            "dataset": options.data,
            "split": "test",
            "test_images": final.images,
            "test_nll_nats": round(final.nll_nats, 4),
            "test_bits_per_dim": round(final.bits_per_dim, 5),
            "conditional_on_labels": final.conditional_on_labels,
            "train_images": len(train_set),
            "epochs": round(state["step"] / steps_per_epoch, 4),
            "steps": state["step"],
            "batch_size": options.batch_size,
            "ema_decay": options.ema or None,
            "images_seen": state["images_seen"],
            "wall_time_s": round(state["wall_time_s"], 1),
            "train_images_per_s": round(state["images_seen"] / max(state["wall_time_s"], 1e-9), 1),
            "hardware": hardware(device),
            "processes": ranks.world,
            "torch": torch.__version__,
            "command": options.command,
            "commit": git_commit(),
            "history": state["history"],
        }
        (options.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if options.sample_grid:
            write_sample_grid(shipped, options.out / "samples.png", options.seed)
        print(f"wrote {options.out}/config.json, model.safetensors, metrics.json")
    ranks.barrier()
    ranks.close()
    return metrics


def served(model: nn.Module, average: WeightAverage | None) -> nn.Module:
    """The weights that are evaluated and shipped: the moving average when training keeps one."""
    return model if average is None else average.model


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: the default on CUDA; on CPU only when asked (fast where the CPU has AMX/AVX512-BF16)."""
    if precision not in ("auto", "float32", "bf16"):
        raise ValueError(f"precision must be auto, float32 or bf16, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def warm_start(model: nn.Module, config: ModelConfig, model_dir: Path) -> None:
    """Start from a trained model's weights; its config must be the one being trained."""
    saved = ModelConfig.load(model_dir / CONFIG_FILE)
    if saved != config:
        raise SystemExit(f"--init-from: {model_dir} holds another model config than the one given")
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in load_file(str(model_dir / WEIGHTS_FILE)).items()})


def subset(dataset: ImageDataset, limit: int) -> ImageDataset:
    return dataclasses.replace(
        dataset,
        images=dataset.images[:limit],
        labels=None if dataset.labels is None else dataset.labels[:limit],
    )


def default_checkpoint_dir(out: Path) -> Path:
    """Checkpoints live outside the repository (only final weights are committed)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "pixelcnn" / "checkpoints" / out.resolve().name


def write_sample_grid(model: nn.Module, path: Path, seed: int) -> None:
    """One sample per class (or 8 for unconditional models), drawn with the cached sampler (the reference
    sampler's images, a hundred times sooner: it took most of a short training run's last minute)."""
    from app.engine import sample_cached
    from app.imaging import save_grid

    config = model.config
    n = config.num_classes if config.conditional else 8
    labels = torch.arange(n) if config.conditional else None
    result = sample_cached(model.eval(), n, labels=labels, seed=seed)
    save_grid(result.images, path, columns=n)


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: `argv` as given to cli.main, or this process's arguments."""
    return " ".join(shlex.quote(a) for a in ["pixelcnn", *(sys.argv[1:] if argv is None else argv)])
