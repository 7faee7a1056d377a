"""``python -m labkit.ollama_lab``: run the Ollama-compatible server (``--help`` lists the flags)."""
import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
