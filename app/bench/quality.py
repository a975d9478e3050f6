"""Sample quality of class-conditional models, judged by an independent Fashion-MNIST classifier.

    pixelcnn bench quality MODEL_DIR [MODEL_DIR ...] [--per-class 100] [--seed 0] [--json]

The classifier (a small CNN, trained here on the training split with a fixed seed the first time and
kept in ~/.cache/pixelcnn/classifier/) is the judge: it never saw a sample. For each model, at
temperature 1 and `--per-class` samples per class:
- class accuracy: how often the classifier names the class the sample was asked for, beside how often
  it names the right class of real test images (the judge's own ceiling: no sampler can be recognised
  more often than real images are, class by class);
- Frechet distance between the classifier's penultimate-layer features (128-d) of the samples and of
  the 10,000 real test images, and the ratio of that to the same distance between the two halves of the
  real test set (how far real images are from each other), as the issue that asked for it defines it;
  since the distance of 1,000 images has more finite-sample bias than that of 5,000 against 5,000, the
  distance of as many real training images as there are samples is given too (the fair yardstick).
All models are measured in one run, with one classifier, so their figures compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from app.data import load_dataset
from app.engine import sample_cached
from app.model import load


class Classifier(nn.Module):
    """Two conv blocks and a 128-unit hidden layer: about 91-92% on Fashion-MNIST's test split."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 7 * 7, 128)
        self.out = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1, 28, 28) -> penultimate features (N, 128)."""
        x = images.float() / 127.5 - 1.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))


def classifier_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "pixelcnn" / "classifier" / "fashion-mnist-cnn.safetensors"


def train_classifier(epochs: int = 3, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    train = load_dataset("fashion-mnist", "train")
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * (len(train) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train) - 127, 128):
            index = order[start : start + 128]
            loss = F.cross_entropy(model(train.images[index]), train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def get_classifier() -> Classifier:
    path = classifier_path()
    model = Classifier()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


@torch.no_grad()
def features_and_predictions(classifier: Classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats, preds = [], []
    for start in range(0, len(images), 500):
        f = classifier.features(images[start : start + 500])
        feats.append(f.double())
        preds.append(classifier.out(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * middle)


def accuracy_per_class(predictions: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [round((predictions[labels == k] == k).double().mean().item(), 3) for k in range(10)]


def evaluate_model(
    model_dir: Path, classifier: Classifier, test_features: torch.Tensor, per_class: int, seed: int
) -> dict:
    model = load(model_dir)
    labels = torch.arange(10).repeat_interleave(per_class)
    started = time.perf_counter()
    images = []
    for start in range(0, len(labels), 64):
        part = labels[start : start + 64]
        result = sample_cached(model, len(part), labels=part, seed=seed * 1000 + start)
        images.append(result.images)
    images = torch.cat(images)
    feats, preds = features_and_predictions(classifier, images)
    return {
        "model": str(model_dir),
        "samples": len(labels),
        "class_accuracy": round((preds == labels).double().mean().item(), 4),
        "class_accuracy_per_class": accuracy_per_class(preds, labels),
        "frechet_distance": round(frechet_distance(feats, test_features), 3),
        "sampling_s": round(time.perf_counter() - started, 1),
    }


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dirs", type=Path, nargs="+", help="model folders to compare")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    classifier = get_classifier()
    test = load_dataset("fashion-mnist", "test")
    test_features, test_preds = features_and_predictions(classifier, test.images)
    halves = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
    half_a, half_b = halves[: len(test) // 2], halves[len(test) // 2 :]
    reference = frechet_distance(test_features[half_a], test_features[half_b])
    train = load_dataset("fashion-mnist", "train")
    count = 10 * args.per_class
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:count]
    train_features, _ = features_and_predictions(classifier, train.images[pick])
    same_size = frechet_distance(train_features, test_features)
    report = {
        "classifier": {
            "path": str(classifier_path()),
            "test_accuracy": round((test_preds == test.labels).double().mean().item(), 4),
            "test_accuracy_per_class": accuracy_per_class(test_preds, test.labels),
        },
        "real_halves_frechet_distance": round(reference, 3),
        "real_train_images": count,
        "real_train_frechet_distance": round(same_size, 3),
        "models": [],
    }
    for model_dir in args.model_dirs:
        result = evaluate_model(model_dir, classifier, test_features, args.per_class, args.seed)
        result["frechet_ratio"] = round(result["frechet_distance"] / reference, 2) if reference > 0 else math.inf
        report["models"].append(result)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"classifier: {report['classifier']['test_accuracy']:.2%} on the 10,000 test images; Frechet distance "
        f"between the two halves of the test set: {reference:.3f}; of {count} real training images to the "
        f"test set: {same_size:.3f}"
    )
    print(f"{'model':40} {'class acc':>9} {'Frechet':>9} {'ratio':>6}")
    for r in report["models"]:
        print(f"{r['model']:40} {r['class_accuracy']:>9.1%} {r['frechet_distance']:>9.3f} {r['frechet_ratio']:>6.2f}")
    print("\nclass accuracy per class (the classifier on real test images first: its ceiling)")
    print(f"{'class':>5} {'real':>6}" + "".join(f" {Path(r['model']).name[:12]:>12}" for r in report["models"]))
    for k in range(10):
        real = report["classifier"]["test_accuracy_per_class"][k]
        print(f"{k:>5} {real:>6.1%}" + "".join(f" {r['class_accuracy_per_class'][k]:>12.1%}" for r in report["models"]))
    return 0
