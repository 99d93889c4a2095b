"""A tiny stand-in for an inference server, used by the pipeline example."""

import json
import sys


def predict(x: float) -> float:
    return 2.0 * x + 1.0


if __name__ == "__main__":
    print(json.dumps({"y": predict(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)}))
