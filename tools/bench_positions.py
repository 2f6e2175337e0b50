"""Position-maintenance study (same as `agentmem bench positions`): NLL over a 20,000-token run."""

import sys

from agentmem.bench.positions import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
