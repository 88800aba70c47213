"""Make the bundled sample catalogue from Debian's `dataset-fashion-mnist` (MIT).

Takes the first N images of each class from the Fashion-MNIST *test* split, writes each as a PNG and
lists them in `catalogue.csv` (id, image, category, title). It invents no metadata: there is no colour
or price in Fashion-MNIST, so the sample has none. Deterministic: the same package gives the same files.

    apt-get install dataset-fashion-mnist
    python scripts/make_sample_catalogue.py data/sample --per-class 200
"""

from __future__ import annotations

import argparse
import csv
import gzip
import struct
from pathlib import Path

from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    """Return (shape, raw bytes) of an IDX file (the MNIST format)."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return shape, data[4 + 4 * ndim :]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()

    (n, rows, cols), pixels = read_idx(args.source / "t10k-images-idx3-ubyte.gz")
    _, labels = read_idx(args.source / "t10k-labels-idx1-ubyte.gz")
    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    taken = [0] * len(CLASSES)
    with (args.out / "catalogue.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "category", "title"])
        for i in range(n):
            label = labels[i]
            if taken[label] >= args.per_class:
                continue
            taken[label] += 1
            product_id = f"fmnist-{i:05d}"
            image = Image.frombytes("L", (cols, rows), pixels[i * rows * cols : (i + 1) * rows * cols])
            image.save(images_dir / f"{product_id}.png", optimize=True)
            category = CLASSES[label]
            writer.writerow(
                [
                    product_id,
                    f"images/{product_id}.png",
                    category,
                    f"{category} (Fashion-MNIST test image {i})",
                ]
            )
    print(f"wrote {sum(taken)} products to {args.out / 'catalogue.csv'}")


if __name__ == "__main__":
    main()
