"""Calibrate a per-head budget profile (same as `agentmem calibrate`); writes policies/profiles/<model>.json."""

import sys

from agentmem.calibrate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
