"""Speed benchmark (same as `agentmem bench speed`): AgentSession vs transformers generate."""

import sys

from agentmem.bench.speed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
