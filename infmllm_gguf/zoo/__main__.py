"""``python -m infmllm_gguf.zoo ARCH OUT.gguf [--dtype q8_0]``: write the zoo's model of ARCH."""
import argparse
import sys

from . import ARCHITECTURES, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infmllm_gguf.zoo",
                                     description="write the zoo's random-weight model of an architecture")
    parser.add_argument("arch", choices=ARCHITECTURES)
    parser.add_argument("out", help="output .gguf path")
    parser.add_argument("--dtype", default="f32", choices=("f32", "f16", "q8_0", "q4_0"))
    args = parser.parse_args(argv)
    print(write(args.out, args.arch, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
