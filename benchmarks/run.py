"""The benchmark suite's one entry point: one table, every figure a ratio measured in this run.

python -m benchmarks                                  # full (several minutes)
python -m benchmarks --quick                          # under about two minutes
python -m benchmarks --markdown docs/benchmarks.md    # also write the page (and a .json beside)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.table import machine, markdown, print_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from benchmarks import conv, conv_sizes, gradient_check, jacobian, mlp, privacy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the under-two-minutes subset")
    parser.add_argument(
        "--markdown", metavar="PATH", help="write the table as Markdown (and PATH's .json)"
    )
    args = parser.parse_args(argv)
    mode = "--quick" if args.quick else "full"
    rows = []
    for module in (mlp, conv, gradient_check, jacobian, privacy):
        rows += module.run(args.quick)
    sizes = conv_sizes.run(args.quick)  # its own section: the size table and the CNNs' ratios
    print(f"# {machine()}; {mode}")
    print_table(rows)
    print(f"\n{conv_sizes.SECTION}")
    conv_sizes.report(sizes)
    if args.markdown:
        command = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
        kept = kept_sections(args.markdown)
        with open(args.markdown, "w") as f:
            f.write(
                markdown(rows, mode, command)
                + "\n"
                + conv_sizes.markdown_section(sizes, mode, command)
                + kept
            )
        write_json(rows + sizes, os.path.splitext(args.markdown)[0] + ".json", mode)


KEPT_FROM = "## The GPU run"
"""The heading from which a regenerated page keeps what it held: the GPU run's section, which
``benchmarks/gpu.py`` writes on another machine and this table cannot reproduce."""


def kept_sections(path: str) -> str:
    """What ``path`` holds from the line starting with ``KEPT_FROM`` on (``""`` if none)."""
    if not os.path.exists(path):
        return ""
    text = open(path).read()
    start = text.find("\n" + KEPT_FROM)
    return "" if start < 0 else "\n" + text[start + 1 :]


if __name__ == "__main__":
    main()
