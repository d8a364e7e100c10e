"""The benchmark suite's one entry point: one table, every figure a ratio measured in this run.

python -m benchmarks            # full (several minutes; full-size Fashion-MNIST rows)
python -m benchmarks --quick    # under two minutes
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        return "-".join(_cell(v) for v in value)
    return str(value)


COLUMNS = ("benchmark", "variant", "ratio", "spread", "target", "ours_ms", "theirs_ms", "peak_mib")


def print_table(rows: list[dict]) -> None:
    """Print rows as one plain-text table (``ratio`` = ours / stock, median over repetitions)."""
    cells = [[_cell(row.get(c, "")) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def machine() -> str:
    """A one-line description of where the table was measured."""
    gpus = tf.config.list_physical_devices("GPU")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{'GPU: ' + ', '.join(g.name for g in gpus) if gpus else 'no GPU'}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> None:
    from benchmarks import conv, gradient_check, jacobian, mlp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the under-two-minutes subset")
    args = parser.parse_args(argv)
    rows = []
    for module in (mlp, conv, gradient_check, jacobian):
        rows += module.run(args.quick)
    print(f"# {machine()}; {'--quick' if args.quick else 'full'}")
    print_table(rows)


if __name__ == "__main__":
    main()
