"""`python -m r1lab ...` (and `torchrun -m r1lab ...`) runs the CLI."""

from r1lab.cli import main

if __name__ == "__main__":
    main()
